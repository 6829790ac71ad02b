{{/*
Chart name, truncated to the 63 characters a DNS label allows.
*/}}
{{- define "convai-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: release-chart unless the release name already contains the chart name.
*/}}
{{- define "convai-gateway.fullname" -}}
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

{{- define "convai-gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "convai-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "convai-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "convai-gateway.labels" -}}
helm.sh/chart: {{ include "convai-gateway.chart" . }}
{{ include "convai-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: gateway
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "convai-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "convai-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The image reference: a digest wins over a tag; the tag defaults to appVersion.
*/}}
{{- define "convai-gateway.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "convai-gateway.secretName" -}}
{{- default (include "convai-gateway.fullname" .) .Values.secret.existingSecret }}
{{- end }}

{{- define "convai-gateway.envConfigMapName" -}}
{{- printf "%s-env" (include "convai-gateway.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "convai-gateway.filesConfigMapName" -}}
{{- printf "%s-files" (include "convai-gateway.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Whether gateway.toml is rendered: any issuer, rate limit, or a Redis topology that lives in TOML.
*/}}
{{- define "convai-gateway.hasToml" -}}
{{- $g := .Values.gatewayToml }}
{{- if or $g.issuers $g.rateLimits (eq .Values.redis.mode "sentinel") (eq .Values.redis.mode "cluster") }}true{{ end }}
{{- end }}

{{/*
Whether the files ConfigMap exists (gateway.toml or any public key).
*/}}
{{- define "convai-gateway.hasFiles" -}}
{{- if or (include "convai-gateway.hasToml" .) .Values.config.jwt.publicKey .Values.gatewayToml.publicKeys }}true{{ end }}
{{- end }}

{{/*
Secret keys exposed as env vars: extraKeys plus the keys of extraData, deduplicated and sorted.
*/}}
{{/*
"true" when the sentinels' password is read from the Secret (key REDIS_SENTINEL_PASSWORD).
*/}}
{{- define "convai-gateway.sentinelPassword" -}}
{{- if and (eq .Values.redis.mode "sentinel") (eq (.Values.redis.sentinel.auth | default "none") "password") }}true{{ end }}
{{- end }}

{{- define "convai-gateway.extraSecretKeys" -}}
{{- $keys := .Values.secret.extraKeys }}
{{- if not .Values.secret.existingSecret }}
{{- $keys = concat $keys (keys .Values.secret.extraData) }}
{{- end }}
{{- $keys | uniq | sortAlpha | toJson }}
{{- end }}

{{/*
gateway.toml. Strings go through toJson: a JSON string is a valid TOML basic string.
*/}}
{{- define "convai-gateway.gatewayToml" -}}
# Rendered by the convai-gateway Helm chart from .Values.gatewayToml and .Values.redis.
{{- range .Values.gatewayToml.issuers }}

[[issuers]]
{{- if .issuer }}
issuer = {{ .issuer | toJson }}
{{- end }}
{{- if .audiences }}
audiences = {{ .audiences | toJson }}
{{- end }}
{{- if .algorithms }}
algorithms = {{ .algorithms | toJson }}
{{- end }}
{{- if .hs256SecretEnv }}
hs256_secret_env = {{ .hs256SecretEnv | toJson }}
{{- end }}
{{- if .jwksUrl }}
jwks_url = {{ .jwksUrl | toJson }}
{{- end }}
{{- if .publicKeyFile }}
public_key_file = {{ printf "/etc/convai-gateway/keys/%s" .publicKeyFile | toJson }}
{{- end }}
{{- if .allowedScopes }}
allowed_scopes = {{ .allowedScopes | toJson }}
{{- end }}
{{- if .userIdPrefix }}
user_id_prefix = {{ .userIdPrefix | toJson }}
{{- end }}
{{- end }}
{{- range $name, $policy := .Values.gatewayToml.rateLimits }}

[rate_limits.{{ $name }}]
{{- if hasKey $policy "limit" }}
limit = {{ $policy.limit | int64 }}
{{- end }}
{{- if hasKey $policy "periodSeconds" }}
period_seconds = {{ $policy.periodSeconds | toJson }}
{{- end }}
{{- if hasKey $policy "burst" }}
burst = {{ $policy.burst | int64 }}
{{- end }}
{{- if hasKey $policy "shadow" }}
shadow = {{ $policy.shadow | toJson }}
{{- end }}
{{- end }}
{{- if eq .Values.redis.mode "sentinel" }}

[redis]
sentinels = {{ .Values.redis.sentinel.hosts | toJson }}
sentinel_service = {{ .Values.redis.sentinel.serviceName | toJson }}
{{- $auth := .Values.redis.sentinel.auth | default "none" }}
{{- if ne $auth "none" }}
sentinel_auth = {{ $auth | toJson }}
{{- end }}
{{- with .Values.redis.sentinel.username }}
sentinel_username = {{ . | toJson }}
{{- end }}
{{- if .Values.redis.sentinel.tls }}
sentinel_tls = true
{{- end }}
{{- else if eq .Values.redis.mode "cluster" }}

[redis]
cluster = true
{{- end }}
{{- end }}

{{- define "convai-gateway.metricsServiceName" -}}
{{- printf "%s-metrics" (include "convai-gateway.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The label that tells the metrics Service from the main one (the ServiceMonitor selects on it).
*/}}
{{- define "convai-gateway.metricsServiceLabel" -}}
convai-gateway/service: metrics
{{- end }}

{{/*
A Prometheus duration of one unit ("500ms", "30s", "2m", "1h"; the schema allows only these) in milliseconds.
*/}}
{{- define "convai-gateway.durationMs" -}}
{{- $n := regexFind "^[0-9]+" . | int64 }}
{{- $unit := regexFind "(ms|s|m|h)$" . }}
{{- $factor := get (dict "ms" 1 "s" 1000 "m" 60000 "h" 3600000) $unit | int64 }}
{{- mul $n $factor }}
{{- end }}
