{{/* Names, labels and the values every template derives from. */}}

{{- define "eptwatch.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-scoped base name; component names append -agent / -aggregator (so keep room: 40). */}}
{{- define "eptwatch.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "eptwatch.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "eptwatch.labels" -}}
helm.sh/chart: {{ include "eptwatch.chart" . }}
app.kubernetes.io/name: {{ include "eptwatch.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: eptwatch
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component: include with (dict "root" $ "component" "agent"). */}}
{{- define "eptwatch.selectorLabels" -}}
app.kubernetes.io/name: {{ include "eptwatch.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "eptwatch.componentLabels" -}}
{{ include "eptwatch.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "eptwatch.agent.fullname" -}}
{{- printf "%s-agent" (include "eptwatch.fullname" .) -}}
{{- end -}}

{{- define "eptwatch.aggregator.fullname" -}}
{{- printf "%s-aggregator" (include "eptwatch.fullname" .) -}}
{{- end -}}

{{- define "eptwatch.aggregator.headlessName" -}}
{{- printf "%s-aggregator-headless" (include "eptwatch.fullname" .) -}}
{{- end -}}

{{- define "eptwatch.agent.serviceAccountName" -}}
{{- if .Values.agent.serviceAccount.create -}}
{{- default (include "eptwatch.agent.fullname" .) .Values.agent.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.agent.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "eptwatch.aggregator.serviceAccountName" -}}
{{- if .Values.aggregator.serviceAccount.create -}}
{{- default (include "eptwatch.aggregator.fullname" .) .Values.aggregator.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.aggregator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "eptwatch.agent.priorityClassName" -}}
{{- if .Values.agent.priorityClass.create -}}
{{- default (include "eptwatch.agent.fullname" .) .Values.agent.priorityClass.name -}}
{{- else -}}
{{- .Values.agent.priorityClassName -}}
{{- end -}}
{{- end -}}

{{/* image reference: include with (dict "image" .Values.image "root" $) */}}
{{- define "eptwatch.image" -}}
{{- $tag := default .root.Chart.AppVersion .image.tag -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* The aggregator's in-cluster DNS names: its certificate carries them all. */}}
{{- define "eptwatch.aggregator.dnsNames" -}}
{{- $svc := include "eptwatch.aggregator.fullname" . -}}
{{- $hl := include "eptwatch.aggregator.headlessName" . -}}
{{- $ns := .Release.Namespace -}}
{{- $d := .Values.clusterDomain -}}
{{- $names := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns $d) $hl (printf "%s.%s" $hl $ns) (printf "%s.%s.svc" $hl $ns) (printf "%s.%s.svc.%s" $hl $ns $d) (printf "*.%s.%s.svc" $hl $ns) (printf "*.%s.%s.svc.%s" $hl $ns $d) -}}
{{- toJson $names -}}
{{- end -}}

{{/* Where agents send reports. */}}
{{- define "eptwatch.agent.server" -}}
{{- if .Values.agent.server -}}
{{- .Values.agent.server -}}
{{- else -}}
{{- if not .Values.aggregator.enabled -}}
{{- fail "agent.server is required when aggregator.enabled is false (the agents need an aggregator to report to)" -}}
{{- end -}}
{{- printf "dns:///%s.%s.svc.%s:%d" (include "eptwatch.aggregator.headlessName" .) .Release.Namespace .Values.clusterDomain (int .Values.aggregator.ports.grpc) -}}
{{- end -}}
{{- end -}}

{{/* The name agents verify in the aggregator's certificate ("" = the target's host). */}}
{{- define "eptwatch.tls.serverName" -}}
{{- if .Values.tls.serverName -}}
{{- .Values.tls.serverName -}}
{{- else if not .Values.agent.server -}}
{{- printf "%s.%s.svc" (include "eptwatch.aggregator.fullname" .) .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{- define "eptwatch.tls.secretName" -}}
{{- default (printf "%s-tls" (include "eptwatch.fullname" .)) .Values.tls.existingSecret -}}
{{- end -}}

{{- define "eptwatch.tls.clientSecretName" -}}
{{- default (printf "%s-agent-tls" (include "eptwatch.fullname" .)) .Values.tls.clientAuth.existingSecret -}}
{{- end -}}

{{- define "eptwatch.auth.agentSecretName" -}}
{{- default (printf "%s-agent-token" (include "eptwatch.fullname" .)) .Values.auth.agentToken.existingSecret -}}
{{- end -}}

{{- define "eptwatch.auth.agentSecretKey" -}}
{{- if .Values.auth.agentToken.existingSecret -}}{{ .Values.auth.agentToken.existingSecretKey }}{{- else -}}token{{- end -}}
{{- end -}}

{{- define "eptwatch.auth.tokensSecretName" -}}
{{- default (printf "%s-tokens" (include "eptwatch.fullname" .)) .Values.auth.serverTokens.existingSecret -}}
{{- end -}}

{{- define "eptwatch.auth.tokensSecretKey" -}}
{{- if .Values.auth.serverTokens.existingSecret -}}{{ .Values.auth.serverTokens.existingSecretKey }}{{- else -}}tokens.yaml{{- end -}}
{{- end -}}

{{/* The file the agent reads host labels from ("" = none). */}}
{{- define "eptwatch.agent.labelsFile" -}}
{{- if .Values.agent.hostLabels.nodeLabels.enabled -}}
/run/eptwatch/labels/labels
{{- else if .Values.agent.hostLabels.podLabels -}}
/etc/eptwatch/podinfo/labels
{{- end -}}
{{- end -}}

{{/* True when the Prometheus Operator's CRDs are served. */}}
{{- define "eptwatch.hasPrometheusOperator" -}}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1" -}}true{{- end -}}
{{- end -}}

{{/*
A checksum of what the pods read from values (config, secrets' values): a change rolls the pods, since
neither binary re-reads its configuration, token or certificates.
*/}}
{{- define "eptwatch.configChecksum" -}}
{{- toJson (list .Values.agent.config .Values.agent.eraOverrides .Values.aggregator.config .Values.tls .Values.auth) | sha256sum -}}
{{- end -}}
