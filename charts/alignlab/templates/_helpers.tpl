{{/* Names are <release>-alignlab-<part>, cut to 63 characters (DNS label limit). */}}
{{- define "alignlab.fullname" -}}
{{- printf "%s-alignlab" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "alignlab.name" -}}
{{- printf "%s-%s" (include "alignlab.fullname" .root) .part | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "alignlab.labels" -}}
app.kubernetes.io/name: alignlab
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component: {root, part}. */}}
{{- define "alignlab.selector" -}}
app.kubernetes.io/name: alignlab
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .part }}
{{- end -}}

{{- define "alignlab.imageRef" -}}
{{- if .digest -}}{{ printf "%s@%s" .repository .digest }}{{- else -}}{{ printf "%s:%s" .repository .tag }}{{- end -}}
{{- end -}}

{{- define "alignlab.image" -}}
{{- include "alignlab.imageRef" .Values.image -}}
{{- end -}}

{{- define "alignlab.mlflowUrl" -}}
{{- printf "http://%s.%s.svc.cluster.local:%d" (include "alignlab.name" (dict "root" . "part" "mlflow")) .Release.Namespace (int .Values.mlflow.port) -}}
{{- end -}}

{{- define "alignlab.s3Endpoint" -}}
{{- if .Values.seaweedfs.enabled -}}
{{- printf "http://%s.%s.svc.cluster.local:8333" (include "alignlab.name" (dict "root" . "part" "seaweedfs")) .Release.Namespace -}}
{{- else -}}
{{- .Values.s3.endpoint -}}
{{- end -}}
{{- end -}}

{{/* Pod and container security defaults: non-root, no privilege escalation, no capabilities, RuntimeDefault seccomp. */}}
{{- define "alignlab.podSecurity" -}}
runAsNonRoot: true
runAsUser: {{ .uid }}
runAsGroup: {{ .uid }}
fsGroup: {{ .uid }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "alignlab.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
{{- end -}}

{{- define "alignlab.s3Env" -}}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef: {name: {{ .Values.s3.existingSecret }}, key: {{ .Values.s3.accessKeyIdKey }}}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ .Values.s3.existingSecret }}, key: {{ .Values.s3.secretAccessKeyKey }}}
{{- end -}}
