{{/* Names. */}}
{{- define "tessera.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tessera.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: broker
{{- end -}}

{{- define "tessera.labels" -}}
{{ include "tessera.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* `repository:tag` or `repository@digest`. */}}
{{- define "tessera.image" -}}
{{- $image := index .root.Values.image .which -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository (default .root.Chart.AppVersion $image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "tessera.serviceHost" -}}
{{- printf "%s.%s.svc" (include "tessera.fullname" .) .Release.Namespace -}}
{{- end -}}

{{- define "tessera.tlsSecret" -}}
{{- printf "%s-tls" (include "tessera.fullname" .) -}}
{{- end -}}

{{- define "tessera.policyConfigMap" -}}
{{- default (printf "%s-policy" (include "tessera.fullname" .)) .Values.policy.existingConfigMap -}}
{{- end -}}

{{/*
The chart-generated CA and serving certificate (ECDSA P-256), reused from the
existing Secret on upgrade so the webhook's caBundle and running sidecars keep
trusting the broker. Rendered once per file: include it where the Secret and
the caBundle are written together.
*/}}
{{- define "tessera.generatedTls" -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "tessera.tlsSecret" .) -}}
{{- if and $existing $existing.data (hasKey $existing.data "ca.crt") -}}
ca.crt: {{ index $existing.data "ca.crt" }}
tls.crt: {{ index $existing.data "tls.crt" }}
tls.key: {{ index $existing.data "tls.key" }}
{{- else -}}
{{- $host := include "tessera.serviceHost" . -}}
{{- $ca := genCAWithKey "tessera-ca" 3650 (genPrivateKey "ecdsa") -}}
{{- $cert := genSignedCertWithKey $host nil (list $host (printf "%s.cluster.local" $host) (include "tessera.fullname" .)) 3650 $ca (genPrivateKey "ecdsa") -}}
ca.crt: {{ $ca.Cert | b64enc }}
tls.crt: {{ $cert.Cert | b64enc }}
tls.key: {{ $cert.Key | b64enc }}
{{- end -}}
{{- end -}}

{{/* Whether the broker calls the Kubernetes API at all. */}}
{{- define "tessera.needsApi" -}}
{{- if or (eq .Values.identity.source "tokenReview") (eq .Values.identity.source "oidcDiscovery") .Values.identity.podLookup (eq .Values.webhook.sidecarMode "auto") -}}true{{- end -}}
{{- end -}}

{{/* The hardened container security context (broker). */}}
{{- define "tessera.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop: [ALL]
  {{- if .Values.memoryLock }}
  # mlockall: the broker's memory, which holds credentials, never reaches swap.
  add: [IPC_LOCK]
  {{- end }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}
