{{/* Chart name. */}}
{{- define "vduse-csi.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name; "vduse-csi" for a release named vduse-csi. */}}
{{- define "vduse-csi.fullname" -}}
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

{{/* The CSI driver name is fixed: the plugin, the topology key and every PV use it. */}}
{{- define "vduse-csi.driverName" -}}
vduse.csi.dev
{{- end }}

{{/* The CSI driver name of Ceph RBD volumes, also fixed (their PVs and StorageClasses use it). */}}
{{- define "vduse-csi.rbdDriverName" -}}
rbd.vduse.csi.dev
{{- end }}

{{/* The ConfigMap of Ceph clusters (clusters.json) that the node pods and the RBD controller mount. */}}
{{- define "vduse-csi.cephClustersName" -}}
{{- printf "%s-ceph-clusters" (include "vduse-csi.fullname" .) }}
{{- end }}

{{/* The Secret with the cephx identity that RBD StorageClasses and the VolumeSnapshotClass name. */}}
{{- define "vduse-csi.rbdSecretName" -}}
{{- default (printf "%s-rbd-secret" (include "vduse-csi.fullname" .)) .Values.rbd.secret.name }}
{{- end }}

{{- define "vduse-csi.rbdSecretNamespace" -}}
{{- default .Release.Namespace .Values.rbd.secret.namespace }}
{{- end }}

{{- define "vduse-csi.rbdControllerSelectorLabels" -}}
app.kubernetes.io/name: {{ include "vduse-csi.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: rbd-controller
{{- end }}

{{- define "vduse-csi.rbdServiceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (printf "%s-rbd-controller" (include "vduse-csi.fullname" .)) .Values.rbd.controller.serviceAccountName }}
{{- else }}
{{- default "default" .Values.rbd.controller.serviceAccountName }}
{{- end }}
{{- end }}

{{- define "vduse-csi.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "vduse-csi.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "vduse-csi.nodeSelectorLabels" -}}
app.kubernetes.io/name: {{ include "vduse-csi.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: node
{{- end }}

{{- define "vduse-csi.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (printf "%s-node" (include "vduse-csi.fullname" .)) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* "repository:tag" of an image entry; call with (dict "image" .Values.image.x "root" $). */}}
{{- define "vduse-csi.image" -}}
{{- printf "%s:%s" .image.repository (toString (default .root.Chart.AppVersion .image.tag)) }}
{{- end }}

{{/* The kubelet directory without a trailing slash. */}}
{{- define "vduse-csi.kubeletDir" -}}
{{- trimSuffix "/" .Values.kubeletDir }}
{{- end }}
