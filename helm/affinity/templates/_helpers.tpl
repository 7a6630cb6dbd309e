{{/* Chart name, truncated to the 63 characters Kubernetes allows in names. */}}
{{- define "affinity.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart unless the release name already holds the chart name. */}}
{{- define "affinity.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "affinity.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "affinity.selectorLabels" -}}
app.kubernetes.io/name: {{ include "affinity.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "affinity.labels" -}}
helm.sh/chart: {{ include "affinity.chart" . }}
{{ include "affinity.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: server
{{- end }}

{{- define "affinity.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "affinity.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "affinity.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The --backend value: server.backend, else gpu when gpu.enabled, else cpu. */}}
{{- define "affinity.backend" -}}
{{- if .Values.server.backend }}
{{- .Values.server.backend }}
{{- else if .Values.gpu.enabled }}
{{- "gpu" }}
{{- else }}
{{- "cpu" }}
{{- end }}
{{- end }}

{{/* StatefulSet when persistence is on (one claim per replica), Deployment otherwise. */}}
{{- define "affinity.statefulset" -}}
{{- if .Values.persistence.enabled }}true{{ end }}
{{- end }}

{{- define "affinity.headlessName" -}}
{{- printf "%s-headless" (include "affinity.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "affinity.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "affinity.fullname" .)) .Values.tls.existingSecret }}
{{- end }}

{{- define "affinity.authSecretName" -}}
{{- default (printf "%s-auth" (include "affinity.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{/* Probe handler: grpc (grpc.health.v1) or httpGet /healthz on the metrics port. */}}
{{- define "affinity.probeMode" -}}
{{- $mode := .Values.probes.mode }}
{{- if eq $mode "auto" }}
{{- if .Values.tls.enabled }}http{{ else }}grpc{{ end }}
{{- else }}
{{- $mode }}
{{- end }}
{{- end }}

{{- define "affinity.probeHandler" -}}
{{- if eq (include "affinity.probeMode" .) "grpc" }}
grpc:
  port: {{ .Values.ports.grpc }}
  service: {{ .Values.probes.grpcService | quote }}
{{- else }}
httpGet:
  path: /healthz
  port: metrics
  scheme: HTTP
{{- end }}
{{- end }}

{{/* terminationGracePeriodSeconds: preStop sleep + server drain + 5 s of slack. */}}
{{- define "affinity.terminationGrace" -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add .Values.lifecycle.preStopSleepSeconds .Values.server.graceSeconds 5 }}
{{- else }}
{{- .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/* Checks that catch contradictory values at render time. */}}
{{- define "affinity.validate" -}}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) }}
{{- if or (not .Values.tls.cert) (not .Values.tls.key) }}
{{- fail "tls.enabled needs tls.existingSecret or both tls.cert and tls.key" }}
{{- end }}
{{- end }}
{{- if and .Values.auth.enabled (not .Values.auth.existingSecret) (not .Values.auth.token) }}
{{- fail "auth.enabled needs auth.existingSecret or auth.token" }}
{{- end }}
{{- if and (eq (include "affinity.probeMode" .) "http") (not .Values.metrics.enabled) }}
{{- fail "HTTP probes (probes.mode http, or auto with tls.enabled) need metrics.enabled: /healthz is served on the metrics port" }}
{{- end }}
{{- if and .Values.persistence.existingClaim (or (gt (int .Values.replicaCount) 1) .Values.autoscaling.enabled) }}
{{- fail "persistence.existingClaim is one volume for one pod: use replicaCount 1 without autoscaling, or leave existingClaim empty to get a claim per replica" }}
{{- end }}
{{- if and .Values.log.enabled (not .Values.log.urls) }}
{{- fail "log.enabled needs log.urls (nats://host:port of the NATS servers with JetStream)" }}
{{- end }}
{{- if and .Values.log.enabled .Values.server.demo }}
{{- fail "log.enabled and server.demo do not go together: load the demo shop through the API" }}
{{- end }}
{{- if and .Values.log.enabled .Values.log.credentials.user (not (or .Values.log.credentials.password (and .Values.log.credentials.existingSecret .Values.log.credentials.passwordKey))) }}
{{- fail "log.credentials.user needs log.credentials.password or existingSecret with passwordKey" }}
{{- end }}
{{- if and .Values.log.enabled (not (eq (empty .Values.log.tls.certKey) (empty .Values.log.tls.keyKey))) }}
{{- fail "log.tls.certKey and log.tls.keyKey go together (mutual TLS): give both or neither" }}
{{- end }}
{{- if and .Values.log.bootstrapFrom (not .Values.auth.enabled) }}
{{- fail "log.bootstrapFrom needs auth.enabled (GetSnapshot needs the admin token)" }}
{{- end }}
{{- if and (not .Values.gpu.enabled) (eq (include "affinity.backend" .) "gpu") }}
{{- fail "server.backend gpu needs gpu.enabled" }}
{{- end }}
{{- end }}

{{/*
The Secret holding the write log's NATS credentials: the existing one, the chart's own when
it creates one (credentials.token or credentials.password set), or empty when the log uses
no credentials.
*/}}
{{- define "affinity.logSecret" -}}
{{- if .Values.log.enabled }}
{{- if .Values.log.credentials.existingSecret }}
{{- .Values.log.credentials.existingSecret }}
{{- else if or .Values.log.credentials.token .Values.log.credentials.password }}
{{- printf "%s-log" (include "affinity.fullname" .) }}
{{- end }}
{{- end }}
{{- end }}
