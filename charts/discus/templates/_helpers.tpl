{{/* Names and labels shared by every template. */}}

{{- define "discus.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's prefix of every name: the release name, with the chart's name added when the
release name does not contain it. */}}
{{- define "discus.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "discus.agentName" -}}
{{- printf "%s-agent" (include "discus.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "discus.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "discus.agentName" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "discus.selectorLabels" -}}
app.kubernetes.io/name: {{ include "discus.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "discus.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "discus.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: discus
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "discus.agentLabels" -}}
{{ include "discus.labels" . }}
app.kubernetes.io/component: agent
{{- end -}}

{{- define "discus.agentSelectorLabels" -}}
{{ include "discus.selectorLabels" . }}
app.kubernetes.io/component: agent
{{- end -}}

{{- define "discus.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* host:port for --http-address; IPv6 addresses in brackets. */}}
{{- define "discus.httpAddress" -}}
{{- if contains ":" .Values.http.address -}}
{{- printf "[%s]:%d" .Values.http.address (int .Values.http.port) -}}
{{- else -}}
{{- printf "%s:%d" .Values.http.address (int .Values.http.port) -}}
{{- end -}}
{{- end -}}

{{- define "discus.bootAddress" -}}
{{- if contains ":" .Values.boot.address -}}
{{- printf "[%s]:%d" .Values.boot.address (int .Values.boot.port) -}}
{{- else -}}
{{- printf "%s:%d" .Values.boot.address (int .Values.boot.port) -}}
{{- end -}}
{{- end -}}

{{- define "discus.uploadAddress" -}}
{{- if contains ":" .Values.upload.address -}}
{{- printf "[%s]:%d" .Values.upload.address (int .Values.upload.port) -}}
{{- else -}}
{{- printf "%s:%d" .Values.upload.address (int .Values.upload.port) -}}
{{- end -}}
{{- end -}}
