{{/* Names, labels and the image reference of the relayer subchart. */}}
{{- define "relayer.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "relayer.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "relayer.selectorLabels" -}}
app.kubernetes.io/name: {{ include "relayer.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: relayer
{{- end -}}

{{- define "relayer.labels" -}}
{{ include "relayer.selectorLabels" . }}
app.kubernetes.io/part-of: pqcnet
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "relayer.image" -}}
{{- $g := .Values.global | default dict -}}
{{- $repo := .Values.image.repository -}}
{{- if $g.imageRegistry }}{{ $repo = printf "%s/%s" $g.imageRegistry $repo }}{{ end -}}
{{- $tag := .Values.image.tag | default $g.imageTag | default .Chart.AppVersion -}}
{{- if .Values.image.digest -}}
{{ $repo }}@{{ .Values.image.digest }}
{{- else -}}
{{ $repo }}:{{ $tag }}
{{- end -}}
{{- end -}}

{{/* Restricted pod security (Pod Security Standards "restricted"). */}}
{{- define "relayer.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "relayer.securityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Env every role container gets: image digest (measured), key passphrase. */}}
{{- define "relayer.env" -}}
- name: PQCNET_IMAGE_DIGEST
  value: {{ .Values.image.digest | quote }}
{{- with .Values.keyPassphraseSecret }}
{{- if .name }}
- name: PQCNET_NODE_PASSPHRASE
  valueFrom:
    secretKeyRef:
      name: {{ .name }}
      key: {{ .key | default "passphrase" }}
{{- end }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "relayer.probes" -}}
startupProbe:
  httpGet: {path: /healthz, port: ops}
  periodSeconds: 2
  failureThreshold: 60
livenessProbe:
  httpGet: {path: /healthz, port: ops}
  periodSeconds: 10
  timeoutSeconds: 3
  failureThreshold: 3
readinessProbe:
  httpGet: {path: /readyz, port: ops}
  periodSeconds: 5
  timeoutSeconds: 3
  failureThreshold: 2
{{- end -}}

{{/* The config file of relayer `name` (dict "ctx" $ "name" ...). */}}
{{- define "relayer.config" -}}
{{- $v := .ctx.Values -}}
{{- $managed := dict "node_id" .name "listen_host" "0.0.0.0" "listen_port" (int $v.service.port) "identity_dir" "/run/secrets/pqcnet/identity" "data_dir" "/var/lib/pqcnet/data" "ledger_dir" "/var/lib/pqcnet/ledger" "metrics_port" (int $v.opsPort) "metrics_host" "0.0.0.0" -}}
{{- dict "relayer" (merge $managed (deepCopy $v.config)) | toYaml -}}
{{- end -}}
