{{- /*
OpenAPI schemas of the policy resources (docs/policy.md, "Policy as
Kubernetes resources"), shared by both CRDs. The broker compiles the
resources exactly as `tessera-broker policy check` does; these schemas and
their CEL rules let the API server refuse what is malformed before that.
*/ -}}
{{- define "tessera.crd.duration" -}}
type: string
maxLength: 32
x-kubernetes-validations:
  - rule: "self.matches('^([0-9]+ ?(ms|s|m|h|d) ?)+$')"
    message: "a duration like 15m, 1h or 90s"
{{- end }}

{{- define "tessera.crd.stringMap" -}}
type: object
additionalProperties:
  type: string
{{- end }}

{{- define "tessera.crd.stringList" -}}
type: array
items:
  type: string
{{- end }}

{{- define "tessera.crd.source" -}}
type: object
description: Where the values come from; exactly one kind.
x-kubernetes-validations:
  - rule: "[has(self.kv2), has(self.database), has(self.pki), has(self.ssh), has(self.vault)].filter(x, x).size() == 1"
    message: "source names exactly one kind: kv2, database, pki, ssh or vault"
properties:
  kv2:
    type: object
    required: [mount, path]
    x-kubernetes-validations:
      - rule: "!self.path.startsWith('/') && !self.path.matches('(^|/)[.][.](/|$)')"
        message: "path is relative to the mount and has no `..` segment"
    properties:
      mount: {type: string, minLength: 1}
      path: {type: string, minLength: 1, maxLength: 1024}
      keys:
        {{- include "tessera.crd.stringList" . | nindent 8 }}
      namespace: {type: string}
  database:
    type: object
    required: [mount, role]
    properties:
      mount: {type: string, minLength: 1}
      role: {type: string, minLength: 1}
      namespace: {type: string}
  pki:
    type: object
    required: [mount, role, commonName]
    properties:
      mount: {type: string, minLength: 1}
      role: {type: string, minLength: 1}
      commonName: {type: string, minLength: 1}
      altNames:
        {{- include "tessera.crd.stringList" . | nindent 8 }}
      key: {type: string, enum: [vault, pod]}
      namespace: {type: string}
  ssh:
    type: object
    required: [mount, role]
    properties:
      mount: {type: string, minLength: 1}
      role: {type: string, minLength: 1}
      principals:
        {{- include "tessera.crd.stringList" . | nindent 8 }}
      extensions:
        {{- include "tessera.crd.stringMap" . | nindent 8 }}
      namespace: {type: string}
  vault:
    type: object
    required: [path]
    properties:
      path: {type: string, minLength: 1}
      operation: {type: string, enum: [read, write]}
      data:
        {{- include "tessera.crd.stringMap" . | nindent 8 }}
      fields:
        {{- include "tessera.crd.stringList" . | nindent 8 }}
      namespace: {type: string}
{{- end }}

{{- /* The fields of a binding both kinds share (all but name and subjects). */ -}}
{{- define "tessera.crd.bindingFields" -}}
description: {type: string}
source:
  {{- include "tessera.crd.source" . | nindent 2 }}
ttl:
  {{- include "tessera.crd.duration" . | nindent 2 }}
renewFraction: {type: number, exclusiveMinimum: true, minimum: 0, exclusiveMaximum: true, maximum: 1}
overlap:
  {{- include "tessera.crd.duration" . | nindent 2 }}
refreshInterval:
  {{- include "tessera.crd.duration" . | nindent 2 }}
output:
  type: object
  properties:
    files:
      {{- include "tessera.crd.stringMap" . | nindent 6 }}
    templates:
      {{- include "tessera.crd.stringMap" . | nindent 6 }}
    templatesOnly: {type: boolean}
    mode: {type: string, enum: ["0400", "0440"]}
    group: {type: integer, minimum: 0}
vaultGate:
  type: object
  required: [mount, role]
  properties:
    mount: {type: string, minLength: 1}
    role: {type: string, minLength: 1}
    namespace: {type: string}
{{- end }}

{{- define "tessera.crd.status" -}}
type: object
properties:
  observedGeneration: {type: integer, format: int64}
  conditions:
    type: array
    x-kubernetes-list-type: map
    x-kubernetes-list-map-keys: [type]
    items:
      type: object
      required: [type, status]
      properties:
        type: {type: string}
        status: {type: string, enum: ["True", "False", "Unknown"]}
        reason: {type: string}
        message: {type: string}
        observedGeneration: {type: integer, format: int64}
        lastTransitionTime: {type: string, format: date-time}
{{- end }}

{{- define "tessera.crd.columns" -}}
- name: Accepted
  type: string
  jsonPath: .status.conditions[?(@.type=="Accepted")].status
- name: Reason
  type: string
  jsonPath: .status.conditions[?(@.type=="Accepted")].reason
- name: Age
  type: date
  jsonPath: .metadata.creationTimestamp
{{- end }}
