{{/* The chart's name, shortened to the 63 characters a label value allows. */}}
{{- define "sandboxd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name: object names and the default ServiceAccount. */}}
{{- define "sandboxd.fullname" -}}
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

{{/* The headless Service's name (kept within 63 characters). */}}
{{- define "sandboxd.headlessName" -}}
{{- printf "%s-headless" (include "sandboxd.fullname" . | trunc 54 | trimSuffix "-") }}
{{- end }}

{{- define "sandboxd.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sandboxd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sandboxd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "sandboxd.labels" -}}
helm.sh/chart: {{ include "sandboxd.chart" . }}
{{ include "sandboxd.selectorLabels" . }}
app.kubernetes.io/version: {{ include "sandboxd.tag" . | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "sandboxd.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sandboxd.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "sandboxd.tag" -}}
{{- default .Chart.AppVersion .Values.image.tag }}
{{- end }}

{{- define "sandboxd.image" -}}
{{- printf "%s:%s" .Values.image.repository (include "sandboxd.tag" .) }}
{{- end }}

{{/* The gRPC port inside the pod; the probes and both Services point at it. */}}
{{- define "sandboxd.grpcPort" -}}
7878
{{- end }}

{{/* Checks that span several values (the schema checks each value alone). */}}
{{- define "sandboxd.validate" -}}
{{- $dataDir := clean .Values.dataDir }}
{{- if and .Values.idleInit.installFromImage (not (hasPrefix (printf "%s/" $dataDir) (clean .Values.idleInit.path))) }}
{{- fail (printf "idleInit.path (%s) must be under dataDir (%s) when idleInit.installFromImage is true" .Values.idleInit.path $dataDir) }}
{{- end }}
{{- if .Values.execIoRelay.enabled }}
{{- $relay := clean .Values.execIoRelay.path }}
{{- if and .Values.execIoRelay.installFromImage (not (hasPrefix (printf "%s/" $dataDir) $relay)) }}
{{- fail (printf "execIoRelay.path (%s) must be under dataDir (%s) when execIoRelay.installFromImage is true" .Values.execIoRelay.path $dataDir) }}
{{- end }}
{{- range $name, $path := dict "idleInit.path" (clean .Values.idleInit.path) "the relay socket" (printf "%s/exec-relay.sock" $dataDir) }}
{{- if eq $relay $path }}
{{- fail (printf "execIoRelay.path (%s) must differ from %s" $relay $name) }}
{{- end }}
{{- end }}
{{- end }}
{{- $netnsDir := clean .Values.network.netnsDir }}
{{- range $name, $path := dict "dataDir" $dataDir "containerd.root" .Values.containerd.root "containerd.state" .Values.containerd.state "cni.binDir" .Values.cni.binDir "cni.confDir" .Values.cni.confDir }}
{{- if eq $netnsDir (clean $path) }}
{{- fail (printf "network.netnsDir (%s) must differ from %s: each is a mount of its own" $netnsDir $name) }}
{{- end }}
{{- end }}
{{- if and .Values.serviceMonitor.enabled (not .Values.metrics.enabled) }}
{{- fail "serviceMonitor.enabled needs metrics.enabled" }}
{{- end }}
{{- if eq (int .Values.metrics.port) (int (include "sandboxd.grpcPort" .)) }}
{{- fail (printf "metrics.port must differ from the gRPC port %s" (include "sandboxd.grpcPort" .)) }}
{{- end }}
{{- $auth := .Values.auth }}
{{- if and $auth.tls.clientCA (not $auth.tls.secretName) }}
{{- fail "auth.tls.clientCA needs auth.tls.secretName: client certificates come with TLS" }}
{{- end }}
{{- if and $auth.trustForwardedClientCert (not $auth.tenants.secretName) }}
{{- fail "auth.trustForwardedClientCert needs auth.tenants.secretName: its spiffe_ids map a forwarded certificate to a tenant" }}
{{- end }}
{{- if and $auth.tls.secretName (not .Values.metrics.enabled) }}
{{- fail "auth.tls.secretName needs metrics.enabled: Kubernetes' gRPC probes cannot speak TLS, so the probes ask the metrics port's /healthz" }}
{{- end }}
{{- if not (or (include "sandboxd.authenticates" .) $auth.allowUnauthenticated) }}
{{- fail (printf "sandboxd listens on 0.0.0.0:%s (every address of the pod) and no caller would authenticate: set auth.tenants.secretName (bearer tokens) and/or auth.tls.secretName with auth.tls.clientCA (client certificates), or auth.allowUnauthenticated=true to rely on the NetworkPolicy alone" (include "sandboxd.grpcPort" .)) }}
{{- end }}
{{- end }}

{{/* Non-empty when callers must authenticate: a tenants file or client certificates. */}}
{{- define "sandboxd.authenticates" -}}
{{- if or .Values.auth.tenants.secretName (and .Values.auth.tls.secretName .Values.auth.tls.clientCA) }}true{{- end }}
{{- end }}
