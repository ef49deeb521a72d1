{{/* Names. */}}
{{- define "tessera.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tessera.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "tessera.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The broker's service account: the chart's, or the one you name. */}}
{{- define "tessera.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tessera.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "tessera.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tessera.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: broker
{{- end -}}

{{- define "tessera.labels" -}}
{{ include "tessera.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* `repository:tag` or `repository@digest`. */}}
{{- define "tessera.image" -}}
{{- $image := index .root.Values.image .which -}}
{{- $repository := $image.repository -}}
{{- with .root.Values.global.imageRegistry -}}
{{- $repository = printf "%s/%s" (trimSuffix "/" .) $repository -}}
{{- end -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repository (default .root.Chart.AppVersion $image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "tessera.serviceHost" -}}
{{- printf "%s.%s.svc" (include "tessera.fullname" .) .Release.Namespace -}}
{{- end -}}

{{- define "tessera.tlsSecret" -}}
{{- if eq .Values.tls.source "existingSecret" -}}
{{- .Values.tls.existingSecret -}}
{{- else -}}
{{- printf "%s-tls" (include "tessera.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "tessera.handleKeySecret" -}}
{{- default (printf "%s-handle-key" (include "tessera.fullname" .)) .Values.leases.handleKey.existingSecret -}}
{{- end -}}

{{/* Where the broker writes what it reads from its Secrets (an in-memory volume). */}}
{{- define "tessera.bootstrapDir" -}}/run/tessera/bootstrap{{- end -}}

{{/* The directory of the serving certificate, its key and CA. */}}
{{- define "tessera.tlsDir" -}}
{{- if eq .Values.tls.source "broker" -}}
{{- include "tessera.bootstrapDir" . -}}
{{- else -}}
/etc/tessera/tls
{{- end -}}
{{- end -}}

{{- define "tessera.policyConfigMap" -}}
{{- default (printf "%s-policy" (include "tessera.fullname" .)) .Values.policy.existingConfigMap -}}
{{- end -}}


{{/* The hardened container security context (broker). */}}
{{- define "tessera.containerSecurityContext" -}}
{{ with .Values.securityContext }}{{ toYaml . }}
{{ end -}}
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
