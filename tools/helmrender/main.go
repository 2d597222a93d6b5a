// Command helmrender renders a Helm chart the way `helm template` does, without Helm.
//
// Helm cannot be installed on the machines this project builds on, but Go's text/template and sprig
// (Debian: golang-go, golang-github-masterminds-sprig-dev, golang-gopkg-yaml.v2-dev) can. This
// program is the thin layer Helm adds on top of them, kept faithful where charts notice:
//
//   - values are read the way Helm reads them (YAML -> JSON -> Go), so every number is a float64:
//     `{{ .Values.big }}` prints 1e+06 here exactly as it does under Helm;
//   - values files are merged like Helm's coalesce: maps deep-merge, a null deletes a default;
//   - toYaml is sigs.k8s.io/yaml's (JSON round trip, sorted keys, yaml.v2 layout, no final newline);
//   - missing keys print as nothing (missingkey=zero, then "<no value>" removed), as in Helm;
//   - include, tpl, required, fail, lookup (always empty: there is no cluster), fromYaml, toJson,
//     .Release, .Chart, .Capabilities (KubeVersion, APIVersions.Has), .Files (Get, GetBytes,
//     Glob, AsConfig, AsSecrets, Lines), .Template (Name, BasePath);
//   - Chart.yaml's kubeVersion constraint is checked against --kube-version.
//
// What it does not do: values.schema.json validation (the tests validate values with jsonschema),
// subcharts, hooks, install-order sorting (documents come out in template file order).
//
// Usage:
//
//	helmrender CHART_DIR [-f values.yaml ...] [--set k=v ...] [--set-string k=v ...]
//	    [--release NAME] [--namespace NS] [--kube-version v1.37.0] [--api-versions G/V[/Kind] ...]
//	    [--notes FILE]
//
// It prints the manifests as multi-document YAML with `# Source:` comments, like `helm template`.
// NOTES.txt is always rendered (so its errors fail the run) and written to --notes FILE if given.
//
// Build (offline, GOPATH mode): GO111MODULE=off GOPATH=/usr/share/gocode go build -o helmrender .
package main

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"text/template"

	"github.com/Masterminds/semver"
	"github.com/Masterminds/sprig"
	"gopkg.in/yaml.v2"
)

// includeDepthLimit mirrors Helm's guard against runaway recursive include.
const includeDepthLimit = 1000

// defaultAPIVersions are the built-in group versions a current cluster serves (Helm's default set
// is the same idea: client-go's scheme). CRD groups come only from --api-versions.
var defaultAPIVersions = []string{
	"v1", "apps/v1", "batch/v1", "policy/v1", "autoscaling/v1", "autoscaling/v2",
	"rbac.authorization.k8s.io/v1", "networking.k8s.io/v1", "scheduling.k8s.io/v1",
	"storage.k8s.io/v1", "coordination.k8s.io/v1", "discovery.k8s.io/v1", "node.k8s.io/v1",
	"apiextensions.k8s.io/v1", "admissionregistration.k8s.io/v1", "certificates.k8s.io/v1",
	"events.k8s.io/v1", "apiregistration.k8s.io/v1", "authentication.k8s.io/v1",
	"authorization.k8s.io/v1", "flowcontrol.apiserver.k8s.io/v1",
}

// VersionSet is .Capabilities.APIVersions.
type VersionSet []string

// Has reports whether "group/version" or "group/version/Kind" is served.
func (v VersionSet) Has(apiVersion string) bool {
	for _, x := range v {
		if x == apiVersion {
			return true
		}
	}
	return false
}

// KubeVersion is .Capabilities.KubeVersion.
type KubeVersion struct {
	Version    string
	Major      string
	Minor      string
	GitVersion string
}

func (k KubeVersion) String() string { return k.Version }

// Capabilities is .Capabilities.
type Capabilities struct {
	APIVersions VersionSet
	KubeVersion KubeVersion
	HelmVersion map[string]string
}

// Files is .Files: the chart's non-template files, by slash-separated path relative to the chart.
type Files map[string][]byte

// Get returns a file's content, or "" when it is absent (as Helm does).
func (f Files) Get(name string) string { return string(f[name]) }

// GetBytes returns a file's content as bytes.
func (f Files) GetBytes(name string) []byte { return f[name] }

// Glob returns the files whose path matches pattern (path.Match syntax; "**" matches across "/").
func (f Files) Glob(pattern string) Files {
	out := Files{}
	for name, data := range f {
		if globMatch(pattern, name) {
			out[name] = data
		}
	}
	return out
}

// Lines splits a file into lines.
func (f Files) Lines(name string) []string {
	s := string(f[name])
	if s == "" {
		return []string{}
	}
	return strings.Split(strings.TrimSuffix(s, "\n"), "\n")
}

// AsConfig renders the files as ConfigMap data (base name -> content), as YAML.
func (f Files) AsConfig() string {
	m := map[string]interface{}{}
	for name, data := range f {
		m[path.Base(name)] = string(data)
	}
	return toYAML(m)
}

// AsSecrets renders the files as Secret data (base name -> base64 content), as YAML.
func (f Files) AsSecrets() string {
	m := map[string]interface{}{}
	for name, data := range f {
		m[path.Base(name)] = base64.StdEncoding.EncodeToString(data)
	}
	return toYAML(m)
}

func globMatch(pattern, name string) bool {
	if !strings.Contains(pattern, "**") {
		ok, _ := path.Match(pattern, name)
		return ok
	}
	// "a/**/b*.json": the part before ** must prefix, the part after must match a suffix of segments.
	parts := strings.SplitN(pattern, "**", 2)
	if !strings.HasPrefix(name, parts[0]) {
		return false
	}
	rest := strings.TrimPrefix(name, parts[0])
	tail := strings.TrimPrefix(parts[1], "/")
	segs := strings.Split(rest, "/")
	for i := range segs {
		if ok, _ := path.Match(tail, strings.Join(segs[i:], "/")); ok {
			return true
		}
	}
	return false
}

// ---- values: read like Helm (YAML -> JSON-compatible Go values, numbers as float64) ----

// jsonish turns yaml.v2's output into what encoding/json would produce from the same document.
func jsonish(v interface{}) (interface{}, error) {
	switch x := v.(type) {
	case map[interface{}]interface{}:
		m := make(map[string]interface{}, len(x))
		for k, val := range x {
			ks, ok := k.(string)
			if !ok {
				// sigs.k8s.io/yaml turns non-string keys into strings too.
				ks = fmt.Sprint(k)
			}
			c, err := jsonish(val)
			if err != nil {
				return nil, err
			}
			m[ks] = c
		}
		return m, nil
	case []interface{}:
		out := make([]interface{}, len(x))
		for i, val := range x {
			c, err := jsonish(val)
			if err != nil {
				return nil, err
			}
			out[i] = c
		}
		return out, nil
	case int:
		return float64(x), nil
	case int64:
		return float64(x), nil
	case uint64:
		return float64(x), nil
	case float64, string, bool, nil:
		return x, nil
	default:
		return fmt.Sprint(x), nil
	}
}

func parseYAMLMap(data []byte, name string) (map[string]interface{}, error) {
	var raw interface{}
	if err := yaml.Unmarshal(data, &raw); err != nil {
		return nil, fmt.Errorf("%s: not valid YAML: %v", name, err)
	}
	if raw == nil {
		return map[string]interface{}{}, nil
	}
	v, err := jsonish(raw)
	if err != nil {
		return nil, fmt.Errorf("%s: %v", name, err)
	}
	m, ok := v.(map[string]interface{})
	if !ok {
		return nil, fmt.Errorf("%s: expected a mapping at the top level", name)
	}
	return m, nil
}

// coalesce merges src over dst like Helm: maps merge recursively, a null in src deletes the key.
func coalesce(dst, src map[string]interface{}) map[string]interface{} {
	for k, sv := range src {
		if sv == nil {
			delete(dst, k)
			continue
		}
		sm, sIsMap := sv.(map[string]interface{})
		dm, dIsMap := dst[k].(map[string]interface{})
		if sIsMap && dIsMap {
			dst[k] = coalesce(dm, sm)
		} else {
			dst[k] = sv
		}
	}
	return dst
}

// setPath implements --set / --set-string for dotted keys (a\.b escapes a dot).
func setPath(vals map[string]interface{}, expr string, typed bool) error {
	eq := strings.Index(expr, "=")
	if eq <= 0 {
		return fmt.Errorf("--set%s %q: expected key=value", map[bool]string{true: "", false: "-string"}[typed], expr)
	}
	key, raw := expr[:eq], expr[eq+1:]
	var parts []string
	var cur strings.Builder
	for i := 0; i < len(key); i++ {
		if key[i] == '\\' && i+1 < len(key) && key[i+1] == '.' {
			cur.WriteByte('.')
			i++
			continue
		}
		if key[i] == '.' {
			parts = append(parts, cur.String())
			cur.Reset()
			continue
		}
		cur.WriteByte(key[i])
	}
	parts = append(parts, cur.String())
	var value interface{} = raw
	if typed {
		// Helm's --set: true/false are bools, integers int64, null deletes; anything else a string.
		switch {
		case raw == "true":
			value = true
		case raw == "false":
			value = false
		case raw == "null":
			value = nil
		default:
			if n, err := strconv.ParseInt(raw, 10, 64); err == nil {
				value = n
			}
		}
	}
	m := vals
	for _, p := range parts[:len(parts)-1] {
		next, ok := m[p].(map[string]interface{})
		if !ok {
			next = map[string]interface{}{}
			m[p] = next
		}
		m = next
	}
	last := parts[len(parts)-1]
	if value == nil {
		delete(m, last)
	} else {
		m[last] = value
	}
	return nil
}

// ---- Helm's template functions ----

// toYAML is sigs.k8s.io/yaml.Marshal followed by Helm's TrimSuffix("\n").
func toYAML(v interface{}) string {
	j, err := json.Marshal(v)
	if err != nil {
		return ""
	}
	var obj interface{}
	if err := yaml.Unmarshal(j, &obj); err != nil {
		return ""
	}
	b, err := yaml.Marshal(obj)
	if err != nil {
		return ""
	}
	return strings.TrimSuffix(string(b), "\n")
}

func fromYAML(s string) map[string]interface{} {
	m, err := parseYAMLMap([]byte(s), "fromYaml")
	if err != nil {
		return map[string]interface{}{"Error": err.Error()}
	}
	return m
}

func fromYAMLArray(s string) []interface{} {
	var raw interface{}
	if err := yaml.Unmarshal([]byte(s), &raw); err != nil {
		return []interface{}{err.Error()}
	}
	v, err := jsonish(raw)
	if err != nil {
		return []interface{}{err.Error()}
	}
	a, ok := v.([]interface{})
	if !ok {
		return []interface{}{"fromYamlArray: not a list"}
	}
	return a
}

func toJSON(v interface{}) string {
	b, err := json.Marshal(v)
	if err != nil {
		return ""
	}
	return string(b)
}

func fromJSON(s string) map[string]interface{} {
	m := map[string]interface{}{}
	if err := json.Unmarshal([]byte(s), &m); err != nil {
		m["Error"] = err.Error()
	}
	return m
}

func fromJSONArray(s string) []interface{} {
	var a []interface{}
	if err := json.Unmarshal([]byte(s), &a); err != nil {
		return []interface{}{err.Error()}
	}
	return a
}

func required(msg string, v interface{}) (interface{}, error) {
	if v == nil {
		return v, errors.New(msg)
	}
	if s, ok := v.(string); ok && s == "" {
		return v, errors.New(msg)
	}
	return v, nil
}

// ---- the chart ----

type chart struct {
	dir       string
	meta      map[string]interface{} // Chart.yaml as read
	values    map[string]interface{} // values.yaml
	templates map[string]string      // "<name>/templates/<rel>" -> source
	files     Files
}

func loadIgnore(dir string) []string {
	data, err := os.ReadFile(filepath.Join(dir, ".helmignore"))
	if err != nil {
		return nil
	}
	var pats []string
	for _, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(line)
		if line != "" && !strings.HasPrefix(line, "#") {
			pats = append(pats, strings.TrimSuffix(line, "/"))
		}
	}
	return pats
}

func ignored(pats []string, rel string) bool {
	for _, p := range pats {
		if ok, _ := path.Match(p, rel); ok {
			return true
		}
		if ok, _ := path.Match(p, path.Base(rel)); ok {
			return true
		}
	}
	return false
}

func loadChart(dir string) (*chart, error) {
	metaBytes, err := os.ReadFile(filepath.Join(dir, "Chart.yaml"))
	if err != nil {
		return nil, fmt.Errorf("%s: not a chart: %v", dir, err)
	}
	meta, err := parseYAMLMap(metaBytes, filepath.Join(dir, "Chart.yaml"))
	if err != nil {
		return nil, err
	}
	name, _ := meta["name"].(string)
	if name == "" {
		return nil, fmt.Errorf("%s: Chart.yaml has no name", dir)
	}
	c := &chart{dir: dir, meta: meta, templates: map[string]string{}, files: Files{}, values: map[string]interface{}{}}
	if vb, err := os.ReadFile(filepath.Join(dir, "values.yaml")); err == nil {
		if c.values, err = parseYAMLMap(vb, filepath.Join(dir, "values.yaml")); err != nil {
			return nil, err
		}
	}
	pats := loadIgnore(dir)
	err = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		rel = filepath.ToSlash(rel)
		if rel == "." {
			return nil
		}
		if ignored(pats, rel) {
			if d.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		if d.IsDir() {
			return nil
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		switch {
		case strings.HasPrefix(rel, "templates/"):
			c.templates[name+"/"+rel] = string(data)
		case rel == "Chart.yaml" || rel == "values.yaml" || rel == "values.schema.json" || strings.HasPrefix(rel, "charts/"):
		default:
			c.files[rel] = data
		}
		return nil
	})
	return c, err
}

func str(m map[string]interface{}, k string) string {
	s, _ := m[k].(string)
	return s
}

// chartObject is .Chart: Chart.yaml with Helm's capitalised field names.
func chartObject(meta map[string]interface{}) map[string]interface{} {
	out := map[string]interface{}{}
	for k, v := range meta {
		switch k {
		case "apiVersion":
			out["APIVersion"] = v
		case "appVersion":
			out["AppVersion"] = v
		case "kubeVersion":
			out["KubeVersion"] = v
		default:
			out[strings.ToUpper(k[:1])+k[1:]] = v
		}
	}
	for _, k := range []string{"Name", "Version", "AppVersion", "Description", "Type", "KubeVersion", "Home", "Icon"} {
		if _, ok := out[k]; !ok {
			out[k] = ""
		}
	}
	return out
}

type renderer struct {
	root  *template.Template
	depth int
}

func (r *renderer) funcs() template.FuncMap {
	f := sprig.TxtFuncMap()
	delete(f, "env")
	delete(f, "expandenv")
	f["toYaml"] = toYAML
	f["toYamlPretty"] = toYAML
	f["fromYaml"] = fromYAML
	f["fromYamlArray"] = fromYAMLArray
	f["toJson"] = toJSON
	f["fromJson"] = fromJSON
	f["fromJsonArray"] = fromJSONArray
	f["required"] = required
	f["lookup"] = func(apiVersion, kind, namespace, name string) (map[string]interface{}, error) {
		return map[string]interface{}{}, nil
	}
	f["include"] = func(name string, data interface{}) (string, error) {
		if r.depth >= includeDepthLimit {
			return "", fmt.Errorf("include %q: nested too deeply (%d)", name, includeDepthLimit)
		}
		r.depth++
		defer func() { r.depth-- }()
		var buf strings.Builder
		if err := r.root.ExecuteTemplate(&buf, name, data); err != nil {
			return "", err
		}
		return buf.String(), nil
	}
	f["tpl"] = func(text string, data interface{}) (string, error) {
		c, err := r.root.Clone()
		if err != nil {
			return "", err
		}
		t, err := c.New("tpl").Parse(text)
		if err != nil {
			return "", fmt.Errorf("tpl: %v", err)
		}
		var buf strings.Builder
		if err := t.Execute(&buf, data); err != nil {
			return "", fmt.Errorf("tpl: %v", err)
		}
		return strings.ReplaceAll(buf.String(), "<no value>", ""), nil
	}
	return f
}

type options struct {
	chartDir    string
	valueFiles  []string
	sets        []string
	setStrings  []string
	release     string
	namespace   string
	kubeVersion string
	apiVersions []string
	notesOut    string
}

func parseArgs(args []string) (*options, error) {
	o := &options{release: "release-name", namespace: "default", kubeVersion: "v1.37.0"}
	for i := 0; i < len(args); i++ {
		a := args[i]
		val := func() (string, error) {
			if eq := strings.Index(a, "="); eq > 0 && strings.HasPrefix(a, "--") {
				return a[eq+1:], nil
			}
			if i+1 >= len(args) {
				return "", fmt.Errorf("%s needs a value", a)
			}
			i++
			return args[i], nil
		}
		flagName := a
		if eq := strings.Index(a, "="); eq > 0 && strings.HasPrefix(a, "--") {
			flagName = a[:eq]
		}
		var err error
		var v string
		switch flagName {
		case "-f", "--values":
			v, err = val()
			o.valueFiles = append(o.valueFiles, v)
		case "--set":
			v, err = val()
			o.sets = append(o.sets, v)
		case "--set-string":
			v, err = val()
			o.setStrings = append(o.setStrings, v)
		case "--release", "--name":
			o.release, err = val()
		case "-n", "--namespace":
			o.namespace, err = val()
		case "--kube-version":
			o.kubeVersion, err = val()
		case "--api-versions", "-a":
			v, err = val()
			o.apiVersions = append(o.apiVersions, strings.Split(v, ",")...)
		case "--notes":
			o.notesOut, err = val()
		case "-h", "--help":
			return nil, errors.New("usage: helmrender CHART_DIR [-f values.yaml ...] [--set k=v] [--set-string k=v] " +
				"[--release NAME] [--namespace NS] [--kube-version vX.Y.Z] [--api-versions G/V[/Kind]] [--notes FILE]")
		default:
			if strings.HasPrefix(a, "-") {
				return nil, fmt.Errorf("unknown flag %s", a)
			}
			if o.chartDir != "" {
				return nil, fmt.Errorf("one chart directory only (got %s and %s)", o.chartDir, a)
			}
			o.chartDir = a
		}
		if err != nil {
			return nil, err
		}
	}
	if o.chartDir == "" {
		return nil, errors.New("usage: helmrender CHART_DIR [flags]: no chart directory given")
	}
	return o, nil
}

func capabilities(o *options) (Capabilities, error) {
	sv, err := semver.NewVersion(o.kubeVersion)
	if err != nil {
		return Capabilities{}, fmt.Errorf("--kube-version %q: %v", o.kubeVersion, err)
	}
	vs := append(VersionSet{}, defaultAPIVersions...)
	vs = append(vs, o.apiVersions...)
	ver := "v" + sv.String()
	return Capabilities{
		APIVersions: vs,
		KubeVersion: KubeVersion{Version: ver, GitVersion: ver, Major: strconv.FormatUint(sv.Major(), 10), Minor: strconv.FormatUint(sv.Minor(), 10)},
		HelmVersion: map[string]string{"Version": "v3.17.0-helmrender", "GoVersion": "go"},
	}, nil
}

// splitDocs splits rendered output on YAML document separators and drops empty documents.
func splitDocs(s string) []string {
	var docs []string
	var cur []string
	flush := func() {
		d := strings.TrimSpace(strings.Join(cur, "\n"))
		if d != "" {
			docs = append(docs, d)
		}
		cur = nil
	}
	for _, line := range strings.Split(s, "\n") {
		if line == "---" || strings.HasPrefix(line, "--- ") {
			flush()
			continue
		}
		cur = append(cur, line)
	}
	flush()
	return docs
}

func run(args []string) error {
	o, err := parseArgs(args)
	if err != nil {
		return err
	}
	c, err := loadChart(o.chartDir)
	if err != nil {
		return err
	}
	caps, err := capabilities(o)
	if err != nil {
		return err
	}
	if kv := str(c.meta, "kubeVersion"); kv != "" {
		cons, err := semver.NewConstraint(kv)
		if err != nil {
			return fmt.Errorf("Chart.yaml kubeVersion %q: %v", kv, err)
		}
		// Helm compares without the pre-release part ("v1.30.0-gke.1" satisfies ">=1.30.0-0").
		kver, _ := semver.NewVersion(caps.KubeVersion.Version)
		if !cons.Check(kver) {
			return fmt.Errorf("chart requires kubeVersion: %s which is incompatible with Kubernetes %s", kv, caps.KubeVersion.Version)
		}
	}
	vals := c.values
	for _, vf := range o.valueFiles {
		data, err := os.ReadFile(vf)
		if err != nil {
			return err
		}
		m, err := parseYAMLMap(data, vf)
		if err != nil {
			return err
		}
		vals = coalesce(vals, m)
	}
	for _, s := range o.sets {
		if err := setPath(vals, s, true); err != nil {
			return err
		}
	}
	for _, s := range o.setStrings {
		if err := setPath(vals, s, false); err != nil {
			return err
		}
	}
	name := str(c.meta, "name")
	release := map[string]interface{}{
		"Name": o.release, "Namespace": o.namespace, "Service": "Helm",
		"IsInstall": true, "IsUpgrade": false, "Revision": 1,
	}
	chartObj := chartObject(c.meta)

	r := &renderer{}
	r.root = template.New("gotpl").Option("missingkey=zero").Funcs(r.funcs())
	names := make([]string, 0, len(c.templates))
	for n := range c.templates {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		if _, err := r.root.New(n).Parse(c.templates[n]); err != nil {
			return fmt.Errorf("parse error: %v", err)
		}
	}
	var out bytes.Buffer
	var notes string
	for _, n := range names {
		base := path.Base(n)
		if strings.HasPrefix(base, "_") {
			continue
		}
		isNotes := base == "NOTES.txt"
		if !isNotes && !strings.HasSuffix(base, ".yaml") && !strings.HasSuffix(base, ".yml") && !strings.HasSuffix(base, ".tpl") {
			continue
		}
		if strings.HasSuffix(base, ".tpl") {
			continue
		}
		data := map[string]interface{}{
			"Values": vals, "Release": release, "Chart": chartObj, "Capabilities": caps, "Files": c.files,
			"Template": map[string]interface{}{"Name": n, "BasePath": name + "/templates"},
		}
		var buf strings.Builder
		if err := r.root.ExecuteTemplate(&buf, n, data); err != nil {
			return fmt.Errorf("render error in %q: %v", n, err)
		}
		rendered := strings.ReplaceAll(buf.String(), "<no value>", "")
		if isNotes {
			notes = rendered
			continue
		}
		for _, doc := range splitDocs(rendered) {
			fmt.Fprintf(&out, "---\n# Source: %s\n%s\n", n, doc)
		}
	}
	if o.notesOut != "" {
		if err := os.WriteFile(o.notesOut, []byte(notes), 0o644); err != nil {
			return err
		}
	}
	_, err = os.Stdout.Write(out.Bytes())
	return err
}

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintf(os.Stderr, "helmrender: %v\n", err)
		os.Exit(1)
	}
}
