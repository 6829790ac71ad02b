{{/*
Environment shared by the gateway container and the check-config init container.
*/}}
{{- define "convai-gateway.env" -}}
{{- $secretName := include "convai-gateway.secretName" . }}
{{- $existing := .Values.secret.existingSecret }}
envFrom:
  - configMapRef:
      name: {{ include "convai-gateway.envConfigMapName" . }}
env:
  # The key is mounted as a file, not an env var: it stays out of /proc/<pid>/environ.
  - name: ELEVENLABS_API_KEY_FILE
    value: /var/run/secrets/convai-gateway/ELEVENLABS_API_KEY
  - name: JWT_HS256_SECRET
    valueFrom:
      secretKeyRef:
        name: {{ $secretName }}
        key: JWT_HS256_SECRET
        optional: true
  {{- if and (ne .Values.redis.mode "none") (or $existing .Values.redis.url) }}
  # url and cluster modes need it (a missing key stops the pod rather than leaving each replica with its own
  # limits and ledger); with Sentinel it carries the primary's password, database, TLS and query options, if any.
  - name: REDIS_URL
    valueFrom:
      secretKeyRef:
        name: {{ $secretName }}
        key: REDIS_URL
        optional: {{ if eq .Values.redis.mode "sentinel" }}true{{ else }}false{{ end }}
  {{- end }}
  {{- if include "convai-gateway.sentinelPassword" . }}
  # Mounted as a file beside the API key, like it: it stays out of /proc/<pid>/environ.
  - name: REDIS_SENTINEL_PASSWORD_FILE
    value: /var/run/secrets/convai-gateway/REDIS_SENTINEL_PASSWORD
  {{- end }}
  {{- range (include "convai-gateway.extraSecretKeys" . | fromJsonArray) }}
  - name: {{ . }}
    valueFrom:
      secretKeyRef:
        name: {{ $secretName }}
        key: {{ . }}
  {{- end }}
{{- end }}

{{- define "convai-gateway.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: prometheus-multiproc
  mountPath: {{ .Values.metrics.multiprocDir }}
- name: api-key
  mountPath: /var/run/secrets/convai-gateway
  readOnly: true
{{- if include "convai-gateway.hasFiles" . }}
- name: config-files
  mountPath: /etc/convai-gateway
  readOnly: true
{{- end }}
{{- end }}
