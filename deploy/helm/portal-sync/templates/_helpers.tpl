{{/* Names and labels. */}}
{{- define "portal-sync.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "portal-sync.fullname" -}}
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

{{- define "portal-sync.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "portal-sync.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: portal-sync
{{- end }}

{{/* Selector labels of one component: (dict "root" $ "component" "worker" ["producer" NAME]) */}}
{{- define "portal-sync.selectorLabels" -}}
app.kubernetes.io/name: {{ include "portal-sync.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- with .producer }}
portal-sync/producer: {{ . }}
{{- end }}
{{- end }}

{{- define "portal-sync.image" -}}
{{- if .Values.image.digest }}
{{- if not (regexMatch "^sha256:[0-9a-f]{64}$" .Values.image.digest) }}
{{- fail (printf "image.digest %q must be sha256: and 64 hexadecimal digits" .Values.image.digest) }}
{{- end }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "portal-sync.rulesChecksum" -}}
{{- include (print .Template.BasePath "/rules-configmap.yaml") . | sha256sum }}
{{- end }}

{{/* What the chart refuses to render. */}}
{{- define "portal-sync.validate" -}}
{{- $kafka := .Values.kafka -}}
{{- if not (has $kafka.securityProtocol (list "PLAINTEXT" "SSL" "SASL_PLAINTEXT" "SASL_SSL")) }}
{{- fail (printf "kafka.securityProtocol must be PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL, not %q" $kafka.securityProtocol) }}
{{- end }}
{{- if and (hasPrefix "SASL" $kafka.securityProtocol) (not $kafka.sasl.existingSecret) }}
{{- fail (printf "kafka.securityProtocol %s needs kafka.sasl.existingSecret (the SASL user name and password)" $kafka.securityProtocol) }}
{{- end }}
{{- if and $kafka.tls.existingSecret (not (has $kafka.securityProtocol (list "SSL" "SASL_SSL"))) }}
{{- fail (printf "kafka.tls is for SSL or SASL_SSL: kafka.securityProtocol %s would leave the connection in clear" $kafka.securityProtocol) }}
{{- end }}
{{- if ne (empty $kafka.tls.certKey) (empty $kafka.tls.keyKey) }}
{{- fail "kafka.tls.certKey and kafka.tls.keyKey go together (mutual TLS)" }}
{{- end }}
{{- if and $kafka.tls.certKey (not $kafka.tls.existingSecret) }}
{{- fail "kafka.tls.certKey needs kafka.tls.existingSecret" }}
{{- end }}
{{- if lt (int $kafka.changePartitions) 1 }}
{{- fail "kafka.changePartitions must be at least 1" }}
{{- end }}
{{- if and .Values.worker.enabled (gt (int .Values.worker.replicas) (int $kafka.changePartitions)) }}
{{- fail (printf "worker.replicas (%d) must not exceed kafka.changePartitions (%d): each partition is read by one worker of the group at a time, so no entity topic can use more workers than it has partitions; raise the partitions first (docs/deploy.md)" (int .Values.worker.replicas) (int $kafka.changePartitions)) }}
{{- end }}
{{- $policy := .Values.networkPolicy }}
{{- if and $policy.enabled (not $policy.metricsFrom) }}
{{- fail "networkPolicy.metricsFrom is required with networkPolicy.enabled: who scrapes the metrics ports (e.g. Prometheus's namespace); without it no one could" }}
{{- end }}
{{- if and $policy.metricsFrom (not (kindIs "slice" $policy.metricsFrom)) }}
{{- fail "networkPolicy.metricsFrom must be a list of NetworkPolicyPeer (- namespaceSelector: …)" }}
{{- end }}
{{- if and $policy.egress (not (kindIs "slice" $policy.egress)) }}
{{- fail "networkPolicy.egress must be a list of NetworkPolicyEgressRule (- to: … ports: …)" }}
{{- end }}
{{- if and $policy.storeEgress (not (kindIs "slice" $policy.storeEgress)) }}
{{- fail "networkPolicy.storeEgress must be a list of NetworkPolicyEgressRule (- to: … ports: …)" }}
{{- end }}
{{- range $p := .Values.producers }}
{{- if and $p.egress (not (kindIs "slice" $p.egress)) }}
{{- fail (printf "producers: %s's egress must be a list of NetworkPolicyEgressRule (- to: … ports: …)" (toString $p.name)) }}
{{- end }}
{{- end }}
{{- $lag := .Values.lagExporter -}}
{{- $storeUsers := or .Values.worker.enabled .Values.storeUpgrade.enabled .Values.toolbox.enabled (and $lag.enabled (eq $lag.offsetsFrom "store")) }}
{{- if and $storeUsers (not .Values.store.existingSecret) }}
{{- fail "store.existingSecret is required: the Secret holding the store URL (PORTAL_SYNC_STORE_URL_FILE), which the worker, the store upgrade, the toolbox and a lag exporter reading the store's offsets use" }}
{{- end }}
{{- $owner := .Values.storeUpgrade.owner }}
{{- if and $owner.existingSecret (not $owner.runtimeRole) }}
{{- fail "storeUpgrade.owner.runtimeRole is required with storeUpgrade.owner.existingSecret: the PostgreSQL role of store.existingSecret's URL, which `store grant` gives its rights" }}
{{- end }}
{{- if and $owner.runtimeRole (not $owner.existingSecret) }}
{{- fail "storeUpgrade.owner.runtimeRole needs storeUpgrade.owner.existingSecret: the owner's URL that upgrades the store and grants" }}
{{- end }}
{{- end }}

{{/* Environment of every portal-sync container: Kafka, topics, the secrets' files, and
     with "store" the store's URL file (producers never get the store's credentials):
     (dict "root" $ "store" true-or-false ["sasl" SECRET] ["ownIdentity" true "clientTls" {...}]);
     "sasl": a pod's own Kafka user (a producer's, the toolbox's; name and password keys as
     kafka.sasl's), else kafka.sasl.existingSecret; with "ownIdentity" a pod never gets the
     workers' client certificate, its own (clientTls) when it has one */}}
{{- define "portal-sync.env" -}}
{{- $kafka := .root.Values.kafka -}}
{{- $sasl := .sasl | default $kafka.sasl.existingSecret -}}
- name: HOME
  value: /tmp
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
- name: PORTAL_SYNC_KAFKA_BOOTSTRAP
  value: {{ $kafka.bootstrap | quote }}
- name: PORTAL_SYNC_KAFKA_SECURITY_PROTOCOL
  value: {{ $kafka.securityProtocol | quote }}
{{- if not .storeOnly }}
{{- if hasPrefix "SASL" $kafka.securityProtocol }}
- name: PORTAL_SYNC_KAFKA_SASL_MECHANISM
  value: {{ $kafka.saslMechanism | quote }}
- name: PORTAL_SYNC_KAFKA_SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ $sasl }}
      key: {{ $kafka.sasl.usernameKey }}
- name: PORTAL_SYNC_KAFKA_SASL_PASSWORD_FILE
  value: /etc/portal-sync/kafka-sasl/password
{{- end }}
{{- if $kafka.tls.existingSecret }}
- name: PORTAL_SYNC_KAFKA_SSL_CAFILE
  value: {{ printf "/etc/portal-sync/kafka-tls/%s" $kafka.tls.caKey | quote }}
{{- end }}
{{- if .ownIdentity }}
{{- if (.clientTls | default dict).existingSecret }}
- name: PORTAL_SYNC_KAFKA_SSL_CERTFILE
  value: /etc/portal-sync/kafka-client-tls/client.crt
- name: PORTAL_SYNC_KAFKA_SSL_KEYFILE
  value: /etc/portal-sync/kafka-client-tls/client.key
{{- end }}
{{- else if and $kafka.tls.existingSecret $kafka.tls.certKey }}
- name: PORTAL_SYNC_KAFKA_SSL_CERTFILE
  value: {{ printf "/etc/portal-sync/kafka-tls/%s" $kafka.tls.certKey | quote }}
- name: PORTAL_SYNC_KAFKA_SSL_KEYFILE
  value: {{ printf "/etc/portal-sync/kafka-tls/%s" $kafka.tls.keyKey | quote }}
{{- end }}
{{- end }}
- name: PORTAL_SYNC_TOPIC_PREFIX
  value: {{ $kafka.topicPrefix | quote }}
- name: PORTAL_SYNC_CHANGE_PARTITIONS
  value: {{ $kafka.changePartitions | quote }}
- name: PORTAL_SYNC_REPLICATION_FACTOR
  value: {{ $kafka.replicationFactor | quote }}
- name: PORTAL_SYNC_GROUP_ID
  value: {{ $kafka.groupId | quote }}
{{- if .store }}
- name: PORTAL_SYNC_STORE_URL_FILE
  value: /etc/portal-sync/store/url
{{- end }}
- name: PORTAL_SYNC_METRICS_HOST
  value: "0.0.0.0"
{{- if .root.Values.referenceKey.existingSecret }}
- name: PORTAL_SYNC_REFERENCE_KEY_FILE
  value: /etc/portal-sync/reference/reference.key
{{- end }}
{{- if and .root.Values.metrics.webConfig.existingSecret (not .storeOnly) }}
- name: PORTAL_SYNC_METRICS_WEB_CONFIG_FILE
  value: {{ printf "/etc/portal-sync/web/%s" .root.Values.metrics.webConfig.file | quote }}
{{- end }}
{{- range $name, $value := .root.Values.env }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end }}

{{/* The registry and authority files (workers, store upgrade). */}}
{{- define "portal-sync.rulesEnv" -}}
- name: PORTAL_SYNC_REGISTRY
  value: /etc/portal-sync/rules/registry.toml
- name: PORTAL_SYNC_AUTHORITY_FILE
  value: /etc/portal-sync/rules/authority.toml
{{- end }}

{{/* Volumes of the secrets' files and /tmp:
     (dict "root" $ "store" BOOL "rules" CONFIGMAP-NAME-or-"" ["storeSecret" NAME "storeKey" KEY]
      ["storeOnly" BOOL]); "storeSecret": another Secret's URL as the store's (the store
     upgrade's owner); "storeOnly": no Kafka identity nor metrics TLS (the store upgrade's
     commands use neither: a pod holding the owner's URL holds no more) */}}
{{- define "portal-sync.volumes" -}}
{{- $v := .root.Values -}}
- name: tmp
  emptyDir:
    sizeLimit: 256Mi
{{- if .store }}
- name: store
  secret:
    secretName: {{ .storeSecret | default $v.store.existingSecret }}
    defaultMode: 0440
    items:
      - key: {{ .storeKey | default $v.store.urlKey }}
        path: url
{{- end }}
{{- if and .store $v.store.tls.existingSecret }}
- name: store-tls
  secret:
    secretName: {{ $v.store.tls.existingSecret }}
    defaultMode: 0440
{{- end }}
{{- if and (hasPrefix "SASL" $v.kafka.securityProtocol) (not .storeOnly) }}
- name: kafka-sasl
  secret:
    secretName: {{ .sasl | default $v.kafka.sasl.existingSecret }}
    defaultMode: 0440
    items:
      - key: {{ $v.kafka.sasl.passwordKey }}
        path: password
{{- end }}
{{- if and $v.kafka.tls.existingSecret (not .storeOnly) }}
- name: kafka-tls
  secret:
    secretName: {{ $v.kafka.tls.existingSecret }}
    defaultMode: 0440
    {{- if .ownIdentity }}
    items:  # the brokers' CA only: the workers' client certificate and key stay theirs
      - key: {{ $v.kafka.tls.caKey }}
        path: {{ $v.kafka.tls.caKey }}
    {{- end }}
{{- end }}
{{- if $v.referenceKey.existingSecret }}
- name: reference-key
  secret:
    secretName: {{ $v.referenceKey.existingSecret }}
    defaultMode: 0440
    items:
      - key: {{ $v.referenceKey.key }}
        path: reference.key
{{- end }}
{{- if and $v.metrics.webConfig.existingSecret (not .storeOnly) }}
- name: web-config
  secret:
    secretName: {{ $v.metrics.webConfig.existingSecret }}
    defaultMode: 0440
{{- end }}
{{- if .rules }}
- name: rules
  configMap:
    name: {{ .rules }}
{{- end }}
{{- end }}

{{- define "portal-sync.volumeMounts" -}}
{{- $v := .root.Values -}}
- name: tmp
  mountPath: /tmp
{{- if .store }}
- name: store
  mountPath: /etc/portal-sync/store
  readOnly: true
{{- end }}
{{- if and .store $v.store.tls.existingSecret }}
- name: store-tls
  mountPath: /etc/portal-sync/store-tls
  readOnly: true
{{- end }}
{{- if and (hasPrefix "SASL" $v.kafka.securityProtocol) (not .storeOnly) }}
- name: kafka-sasl
  mountPath: /etc/portal-sync/kafka-sasl
  readOnly: true
{{- end }}
{{- if and $v.kafka.tls.existingSecret (not .storeOnly) }}
- name: kafka-tls
  mountPath: /etc/portal-sync/kafka-tls
  readOnly: true
{{- end }}
{{- if $v.referenceKey.existingSecret }}
- name: reference-key
  mountPath: /etc/portal-sync/reference
  readOnly: true
{{- end }}
{{- if and $v.metrics.webConfig.existingSecret (not .storeOnly) }}
- name: web-config
  mountPath: /etc/portal-sync/web
  readOnly: true
{{- end }}
{{- if .rules }}
- name: rules
  mountPath: /etc/portal-sync/rules
  readOnly: true
{{- end }}
{{- end }}

{{/* Startup, liveness and readiness probes on the container port named "metrics". */}}
{{- define "portal-sync.probes" -}}
{{- $scheme := ternary "HTTPS" "HTTP" (not (empty .Values.metrics.webConfig.existingSecret)) -}}
startupProbe:
  httpGet: {path: /healthz, port: metrics, scheme: {{ $scheme }}}
  periodSeconds: 10
  failureThreshold: 30
livenessProbe:
  httpGet: {path: /healthz, port: metrics, scheme: {{ $scheme }}}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 3
readinessProbe:
  httpGet: {path: /readyz, port: metrics, scheme: {{ $scheme }}}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 2
{{- end }}

{{/* Pod-level settings shared by every pod: (dict "root" $ "spec" COMPONENT-VALUES) */}}
{{- define "portal-sync.podSettings" -}}
{{- $v := .root.Values -}}
automountServiceAccountToken: false
{{- with $v.serviceAccountName }}
serviceAccountName: {{ . }}
{{- end }}
{{- with $v.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
securityContext:
  {{- toYaml $v.podSecurityContext | nindent 2 }}
{{- with (default $v.nodeSelector .spec.nodeSelector) }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (default $v.tolerations .spec.tolerations) }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (default $v.affinity .spec.affinity) }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The Service of a component's metrics port:
     (dict "root" $ "component" C "job" J "port" P ["producer" NAME]) */}}
{{- define "portal-sync.metricsService" -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "portal-sync.fullname" .root }}-{{ .component }}{{ with .producer }}-{{ . }}{{ end }}
  labels:
    {{- include "portal-sync.labels" .root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
    portal-sync/job: {{ .job }}
    portal-sync/metrics: "true"
spec:
  type: ClusterIP
  # Scraped while unready too: a worker waiting for the store or the broker is unready,
  # and its portal_sync_worker_retrying_seconds is what PortalSyncWorkerStalled watches.
  publishNotReadyAddresses: true
  selector:
    {{- include "portal-sync.selectorLabels" . | nindent 4 }}
  ports:
    - name: metrics
      port: {{ .port }}
      targetPort: metrics
      protocol: TCP
{{- end }}

{{/* A pod with a Kafka identity of its own, never the workers' (a producer, the toolbox):
     what the chart refuses. (dict "root" $ "who" "producers: p1" "at" "" or "toolbox."
     "sasl" SECRET "clientTls" {...}) */}}
{{- define "portal-sync.ownIdentity.validate" -}}
{{- $protocol := .root.Values.kafka.securityProtocol -}}
{{- if and .sasl (not (hasPrefix "SASL" $protocol)) }}
{{- fail (printf "%s sets kafkaSasl, but kafka.securityProtocol %s has no SASL user: it would connect as the workers" .who $protocol) }}
{{- end }}
{{- if and (hasPrefix "SASL" $protocol) (not .sasl) }}
{{- fail (printf "%s needs %skafkaSasl.existingSecret, a Kafka user of its own: with the workers' it could read every change topic (docs/security.md)" .who .at) }}
{{- end }}
{{- if and .clientTls.existingSecret (not (has $protocol (list "SSL" "SASL_SSL"))) }}
{{- fail (printf "%s sets kafkaTls (a client certificate), but kafka.securityProtocol %s has no TLS" .who $protocol) }}
{{- end }}
{{- if and (eq $protocol "SSL") .root.Values.kafka.tls.certKey (not .clientTls.existingSecret) }}
{{- fail (printf "%s needs %skafkaTls.existingSecret, a client certificate of its own: with the workers' it could read every change topic (docs/security.md)" .who .at) }}
{{- end }}
{{- end }}

{{/* Its own client certificate (kafkaTls), as PORTAL_SYNC_KAFKA_SSL_CERTFILE/_KEYFILE name
     it: the volume and the mount. (dict "clientTls" {...} with an existingSecret) */}}
{{- define "portal-sync.clientTlsVolume" -}}
- name: kafka-client-tls
  secret:
    secretName: {{ .clientTls.existingSecret }}
    defaultMode: 0440
    items:
      - key: {{ .clientTls.certKey | default "tls.crt" }}
        path: client.crt
      - key: {{ .clientTls.keyKey | default "tls.key" }}
        path: client.key
{{- end }}

{{- define "portal-sync.clientTlsMount" -}}
- name: kafka-client-tls
  mountPath: /etc/portal-sync/kafka-client-tls
  readOnly: true
{{- end }}
