{{/* Full name of the release's objects: the release name, suffixed with the chart's unless it has it. */}}
{{- define "rayprism.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "rayprism.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "rayprism.labels" -}}
{{ include "rayprism.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "rayprism.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "rayprism.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* An image reference from (dict "image" <values> "appVersion" <default tag>): repository@digest when
a digest is set (the tag is then ignored), repository:tag otherwise. */}}
{{- define "rayprism.imageRef" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (default .appVersion .image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "rayprism.operatorImage" -}}
{{- include "rayprism.imageRef" (dict "image" .Values.image "appVersion" .Chart.AppVersion) -}}
{{- end -}}

{{- define "rayprism.workerImage" -}}
{{- include "rayprism.imageRef" (dict "image" .Values.defaultWorkerImage "appVersion" .Chart.AppVersion) -}}
{{- end -}}

{{/* The user's Secret holding the key of the InferenceDeployments' admin tokens; empty: the chart makes
its own. (adminKey may be missing: `helm upgrade --reuse-values` from a chart without it.) */}}
{{- define "rayprism.adminKeyExistingSecret" -}}
{{- (.Values.adminKey | default dict).existingSecret | default "" -}}
{{- end -}}

{{- define "rayprism.adminKeySecretName" -}}
{{- include "rayprism.adminKeyExistingSecret" . | default (printf "%s-admin-key" (include "rayprism.fullname" .)) -}}
{{- end -}}

{{/* Peering is on exactly when more than one operator pod runs. */}}
{{- define "rayprism.peering" -}}
{{- if gt (int .Values.replicas) 1 }}true{{ end -}}
{{- end -}}

{{- define "rayprism.peeringName" -}}
{{- default (include "rayprism.fullname" .) .Values.peering.name -}}
{{- end -}}

{{/*
RBAC rules for what the operator touches in the namespaces it serves: a ClusterRole's rules for a
cluster-wide install, each namespace's Role's rules otherwise.
*/}}
{{- define "rayprism.operatorRules" -}}
# Only what the operator calls, as the API server's audit log of the e2e suite shows it (e2e/test_security.py
# checks that log against these rules). The API it serves: read and watched by kopf and the reconciler,
# which writes nothing but the status, and, for spec.autoscaling, spec.replicas through the scale subresource
# (as an HPA does; never the rest of the spec).
- apiGroups: [rayprism.dev]
  resources: [inferencedeployments]
  verbs: [get, list, watch]
- apiGroups: [rayprism.dev]
  resources: [inferencedeployments/status, inferencedeployments/scale]
  verbs: [patch]
# Every child's ownerReference sets blockOwnerDeletion; where the OwnerReferencesPermissionEnforcement
# admission plugin is on (OpenShift, and the e2e control plane), that needs update on the owner's
# finalizers. No request uses it: admission checks it.
- apiGroups: [rayprism.dev]
  resources: [inferencedeployments/finalizers]
  verbs: [update]
# The replicas it creates: one KubeRay RayCluster each; listed and watched, never read one by one.
- apiGroups: [ray.io]
  resources: [rayclusters]
  verbs: [list, watch, create, patch, delete]
# The replicas' pods, read only: why one does not run (unschedulable, image pull, crash loop) reaches the
# InferenceDeployment's Degraded condition and Events.
- apiGroups: [""]
  resources: [pods]
  verbs: [list]
# The endpoint Service of every InferenceDeployment: read, created, patched back when it drifts.
- apiGroups: [""]
  resources: [services]
  verbs: [get, create, patch]
# The admin-token Secret of every InferenceDeployment: created, never read (the token is derived from the
# operator's key), listed, watched or deleted: the garbage collector removes it, the NetworkPolicies, the
# Service and the RayClusters' pods through their ownerReferences.
- apiGroups: [""]
  resources: [secrets]
  verbs: [create]
# The NetworkPolicies of every InferenceDeployment: Ray's ports within one replica, the server's ports.
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [list, create, patch, delete]
# The InferencePool (Gateway API Inference Extension) of an InferenceDeployment that asks for one: read,
# created, patched back when it drifts, deleted when spec.router.inferencePool goes. Harmless where its CRD
# is not installed.
- apiGroups: [inference.networking.k8s.io]
  resources: [inferencepools]
  verbs: [get, create, patch, delete]
# Events about scaling and rollouts (kopf posts core/v1 events and never updates one).
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end -}}
