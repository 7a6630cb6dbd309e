#!/usr/bin/env bash
# Chart and image tests for helm/affinity and the Dockerfile: `helm lint` and `helm template` with each values file in
# helm/affinity/ci/, then checks on the rendered manifests (GPU limits only when enabled,
# native gRPC probes on the gRPC port, Secrets mounted, no root, CPU-only flags, StatefulSet
# with claims when persistent) and on values the schema or the templates must refuse.
#
# Needs a helm v4 binary on PATH or in <repo>/.tools/bin (scripts/install-helm.sh puts it
# there). A missing helm is a failure, not a skip: CI installs it. Plain bash, grep and awk.
# Ends with "N passed, M failed"; exits non-zero when anything failed.
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
chart="$repo/helm/affinity"
passed=0
failed=0

helm_bin="$(command -v helm || true)"
if [ -z "$helm_bin" ] && [ -x "$repo/.tools/bin/helm" ]; then helm_bin="$repo/.tools/bin/helm"; fi
if [ -z "$helm_bin" ]; then
    echo "FAIL: no helm on PATH or in $repo/.tools/bin (run scripts/install-helm.sh)"
    echo "0 passed, 1 failed"
    exit 1
fi
echo "using $helm_bin ($("$helm_bin" version --template '{{.Version}}'))"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

pass() { passed=$((passed + 1)); echo "ok   $1"; }
fail() { failed=$((failed + 1)); echo "FAIL $1"; }
# check DESCRIPTION COMMAND...: passes when the command succeeds.
check() {
    local desc="$1"
    shift
    if "$@" >/dev/null 2>&1; then pass "$desc"; else fail "$desc"; fi
}
# refute DESCRIPTION COMMAND...: passes when the command fails.
refute() {
    local desc="$1"
    shift
    if "$@" >/dev/null 2>&1; then fail "$desc"; else pass "$desc"; fi
}

# block KEY: reads YAML on stdin and prints the lines nested under the first "KEY:" line,
# including a sequence written at the key's own indentation ("drop:" then "- ALL").
block() {
    awk -v key="$1" '
        function indent(s) { match(s, /^ */); return RLENGTH }
        !found && $0 ~ ("^ *(- )?" key ":[ ]*$") {
            found = 1; ind = indent($0); item = ($0 ~ /^ *- /); next
        }
        found {
            if ($0 ~ /^ *$/) next
            if (indent($0) < ind || (indent($0) == ind && (item || $0 !~ /^ *- /))) exit
            print
        }
    '
}
# has FILE REGEX / lacks FILE REGEX (extended regex, whole file).
has() { grep -Eq -- "$2" "$1"; }
lacks() { ! grep -Eq -- "$2" "$1"; }
# in_block FILE KEY REGEX: REGEX matches a line nested under KEY (first occurrence).
in_block() { block "$2" <"$1" | grep -Eq -- "$3"; }
# kind_count FILE KIND: number of documents of that kind.
kind_count() { grep -Ec "^kind: $2\$" "$1"; }
is_count() { [ "$(kind_count "$1" "$2")" -eq "$3" ]; }
# doc FILE KIND NAME: prints the document of that kind and metadata.name.
doc() {
    awk -v kind="$2" -v name="$3" '
        /^---/ { if (k && n) { printf "%s", buf; exit } buf = ""; k = 0; n = 0; meta = 0; next }
        { buf = buf $0 "\n" }
        $0 == "kind: " kind { k = 1 }
        /^metadata:/ { meta = 1; next }
        meta && $0 ~ "^  name: \"?" name "\"?$" { n = 1 }
        /^[^ ]/ { meta = 0 }
        END { if (k && n) printf "%s", buf }
    ' "$1"
}

# render NAME [helm args...]: helm template into $work/NAME.yaml and the workload alone into
# $work/NAME.workload.yaml. Returns helm's status.
render() {
    local name="$1"
    shift
    "$helm_bin" template rel "$chart" --namespace shop "$@" >"$work/$name.yaml" 2>"$work/$name.err" || return 1
    "$helm_bin" template rel "$chart" --namespace shop "$@" \
        --show-only templates/workload.yaml >"$work/$name.workload.yaml" 2>>"$work/$name.err"
}

# probes_are WORKLOAD grpc|http: all three probes use that handler on the right port.
probes_are() {
    local f="$1" mode="$2" probe
    for probe in startupProbe livenessProbe readinessProbe; do
        if [ "$mode" = grpc ]; then
            block "$probe" <"$f" | block grpc | grep -Eq '^ *port: 50051$' || return 1
            block "$probe" <"$f" | grep -Eq '^ *httpGet:' && return 1
        else
            block "$probe" <"$f" | block httpGet | grep -Eq '^ *path: /healthz$' || return 1
            block "$probe" <"$f" | block httpGet | grep -Eq '^ *port: metrics$' || return 1
            block "$probe" <"$f" | grep -Eq '^ *grpc:' && return 1
        fi
    done
    return 0
}
# arg_pair WORKLOAD FLAG VALUE: args hold FLAG followed by VALUE.
arg_pair() {
    block args <"$1" | awk -v flag="$2" -v value="$3" '
        { sub(/^ *- /, ""); gsub(/"/, "") }
        prev == flag && $0 == value { found = 1 }
        { prev = $0 }
        END { exit !found }
    '
}
has_arg() { block args <"$1" | grep -Eq -- "^ *- \"?$2\"?$"; }
gpu_limit() { block resources <"$1" | block limits | grep -Eq '^ *nvidia.com/gpu: 1$'; }
gpu_request() { block resources <"$1" | block requests | grep -Eq '^ *nvidia.com/gpu: 1$'; }
# no_root WORKLOAD: pod and container security contexts keep the process unprivileged.
no_root() {
    local f="$1" pod ctr
    pod="$(block template <"$f" | block spec | block securityContext)"
    ctr="$(block containers <"$f" | block securityContext)"
    grep -Eq '^ *runAsNonRoot: true$' <<<"$pod" &&
        grep -Eq '^ *runAsUser: 10001$' <<<"$pod" &&
        grep -Eq '^ *type: RuntimeDefault$' <<<"$pod" &&
        grep -Eq '^ *runAsNonRoot: true$' <<<"$ctr" &&
        grep -Eq '^ *readOnlyRootFilesystem: true$' <<<"$ctr" &&
        grep -Eq '^ *allowPrivilegeEscalation: false$' <<<"$ctr" &&
        block capabilities <<<"$ctr" | block drop | grep -Eq '^ *- ALL$'
}

# ---- lint -------------------------------------------------------------------------------
check "helm lint --strict (chart defaults)" "$helm_bin" lint --strict "$chart"
for values in "$chart"/ci/*-values.yaml; do
    check "helm lint --strict -f ci/$(basename "$values")" "$helm_bin" lint --strict "$chart" -f "$values"
done

# ---- default values: one GPU pod, in memory, gRPC probes ---------------------------------
if render default -f "$chart/ci/default-values.yaml"; then pass "render default"; else fail "render default: $(cat "$work/default.err")"; fi
f="$work/default.yaml"
w="$work/default.workload.yaml"
check "default: a Deployment, no StatefulSet" is_count "$f" Deployment 1
check "default: no StatefulSet" is_count "$f" StatefulSet 0
check "default: nvidia.com/gpu: 1 in limits" gpu_limit "$w"
check "default: nvidia.com/gpu: 1 in requests" gpu_request "$w"
check "default: --backend gpu" arg_pair "$w" --backend gpu
check "default: --listen 0.0.0.0:50051" arg_pair "$w" --listen 0.0.0.0:50051
check "default: --metrics-listen 0.0.0.0:9090" arg_pair "$w" --metrics-listen 0.0.0.0:9090
check "default: startup, liveness and readiness are gRPC probes on 50051" probes_are "$w" grpc
check "default: grpc container port 50051" in_block "$w" ports '^ *containerPort: 50051$'
check "default: metrics container port 9090" in_block "$w" ports '^ *containerPort: 9090$'
check "default: runs as non-root, read-only root, no escalation, drops ALL, seccomp" no_root "$w"
check "default: /tmp is an emptyDir" in_block "$w" volumes '^ *emptyDir:'
check "default: terminationGracePeriodSeconds 30 = preStop 5 + grace 20 + 5" has "$w" '^ *terminationGracePeriodSeconds: 30$'
check "default: --grace-seconds 20" arg_pair "$w" --grace-seconds 20
check "default: preStop sleeps 5 s" has "$w" 'command: \["/bin/sleep", "5"\]'
check "default: tolerates the nvidia.com/gpu taint" in_block "$w" tolerations 'key: nvidia.com/gpu'
check "default: image affinityd:<appVersion>" has "$w" 'image: "affinityd:0\.1\.0"'
refute "default: no --data-dir (in memory)" has_arg "$w" --data-dir
check "default: no Secret" is_count "$f" Secret 0
check "default: no HPA" is_count "$f" HorizontalPodAutoscaler 0
check "default: no ServiceMonitor" is_count "$f" ServiceMonitor 0
check "default: a PodDisruptionBudget" is_count "$f" PodDisruptionBudget 1
check "default: one Service (no headless)" is_count "$f" Service 1
svc="$(doc "$f" Service rel-affinity)"
check "default: Service grpc port 50051 with appProtocol grpc" \
    grep -Pzq 'name: grpc\n\s+port: 50051\n\s+targetPort: grpc\n\s+protocol: TCP\n\s+appProtocol: grpc' <<<"$svc"
check "default: Service metrics port 9090 with appProtocol http" \
    grep -Pzq 'name: metrics\n\s+port: 9090\n\s+targetPort: metrics\n\s+protocol: TCP\n\s+appProtocol: http' <<<"$svc"
check "default: service account token not mounted" has "$w" '^ *automountServiceAccountToken: false$'

# ---- GPU: two pods, scheduling knobs, headless Service, tuned flags ---------------------
if render gpu -f "$chart/ci/gpu-values.yaml"; then pass "render gpu"; else fail "render gpu: $(cat "$work/gpu.err")"; fi
f="$work/gpu.yaml"
w="$work/gpu.workload.yaml"
check "gpu: nvidia.com/gpu: 1 in limits" gpu_limit "$w"
check "gpu: nvidia.com/gpu: 1 in requests" gpu_request "$w"
check "gpu: user resources kept next to the GPU" in_block "$w" limits '^ *memory: 32Gi$'
check "gpu: replicas 2" has "$w" '^  replicas: 2$'
check "gpu: runtimeClassName nvidia" has "$w" '^ *runtimeClassName: nvidia$'
check "gpu: nodeSelector passed through" in_block "$w" nodeSelector 'nvidia.com/gpu.present: "true"'
check "gpu: user toleration and GPU toleration both present" \
    bash -c "grep -q 'value: recommendations' '$w' && grep -q 'key: nvidia.com/gpu' '$w'"
check "gpu: affinity passed through" in_block "$w" affinity 'NVIDIA-H100-80GB-HBM3'
check "gpu: topologySpreadConstraints get this release's labelSelector" \
    bash -c "awk '/topologySpreadConstraints:/,0' '$w' | grep -q 'app.kubernetes.io/instance: rel'"
check "gpu: --max-batch 256" arg_pair "$w" --max-batch 256
check "gpu: --max-wait-us 500" arg_pair "$w" --max-wait-us 500
check "gpu: --queue-limit 4096" arg_pair "$w" --queue-limit 4096
check "gpu: --threads 8" arg_pair "$w" --threads 8
check "gpu: --gpu-device 0 (zero is passed, not dropped)" arg_pair "$w" --gpu-device 0
check "gpu: gRPC probes on 50051" probes_are "$w" grpc
check "gpu: prometheus scrape annotations" in_block "$w" annotations 'prometheus.io/port: "9090"'
check "gpu: headless Service rendered" is_count "$f" Service 2
check "gpu: headless Service has clusterIP None" \
    bash -c "grep -A30 'name: rel-affinity-headless' '$f' | grep -q 'clusterIP: None'"

# ---- CPU-only ---------------------------------------------------------------------------
if render cpu -f "$chart/ci/cpu-values.yaml"; then pass "render cpu"; else fail "render cpu: $(cat "$work/cpu.err")"; fi
f="$work/cpu.yaml"
w="$work/cpu.workload.yaml"
check "cpu: --backend cpu" arg_pair "$w" --backend cpu
check "cpu: no nvidia.com/gpu anywhere in the manifests" lacks "$f" 'nvidia.com/gpu'
check "cpu: NVIDIA_VISIBLE_DEVICES=void hides node GPUs" \
    grep -Pzq 'name: NVIDIA_VISIBLE_DEVICES\n\s+value: void' "$w"
check "cpu: CPU limits from values" in_block "$w" limits '^ *cpu: "8"$'
check "cpu: gRPC probes on 50051" probes_are "$w" grpc
check "cpu: runs as non-root" no_root "$w"
check "cpu: PDB uses minAvailable 2 when set" has "$f" '^  minAvailable: 2$'
check "gpu values: NVIDIA_VISIBLE_DEVICES left to the device plugin" lacks "$work/gpu.workload.yaml" NVIDIA_VISIBLE_DEVICES

# ---- TLS and bearer-token auth ----------------------------------------------------------
if render tls -f "$chart/ci/tls-auth-values.yaml"; then pass "render tls+auth"; else fail "render tls+auth: $(cat "$work/tls.err")"; fi
f="$work/tls.yaml"
w="$work/tls.workload.yaml"
check "tls: a kubernetes.io/tls Secret and an Opaque token Secret" \
    bash -c "grep -q '^type: kubernetes.io/tls$' '$f' && grep -q '^type: Opaque$' '$f'"
check "tls: TLS Secret holds the cert" in_block "$f" data '^ *tls.crt: "LS0t'
check "tls: token Secret holds the base64 token" has "$f" "token: \"$(printf %s ci-test-token-not-a-secret | base64)\""
check "tls: --tls-cert points at the mounted Secret" arg_pair "$w" --tls-cert /etc/affinity/tls/tls.crt
check "tls: --tls-key points at the mounted Secret" arg_pair "$w" --tls-key /etc/affinity/tls/tls.key
check "auth: --token-file points at the mounted Secret" arg_pair "$w" --token-file /etc/affinity/auth/token
check "tls: volume mounted read-only at /etc/affinity/tls" \
    grep -Pzq 'name: tls\n\s+mountPath: /etc/affinity/tls\n\s+readOnly: true' "$w"
check "auth: volume mounted read-only at /etc/affinity/auth" \
    grep -Pzq 'name: auth\n\s+mountPath: /etc/affinity/auth\n\s+readOnly: true' "$w"
check "tls: volume from Secret rel-affinity-tls" \
    grep -Pzq 'name: tls\n\s+secret:\n\s+secretName: rel-affinity-tls' "$w"
check "auth: volume from Secret rel-affinity-auth, key token" \
    grep -Pzq 'secretName: rel-affinity-auth\n\s+defaultMode: 0?440\n\s+items:\n\s+- key: token\n\s+path: token' "$w"
check "tls: probes fall back to HTTP /healthz on the metrics port (kubelet gRPC probes lack TLS)" probes_are "$w" http
check "tls: pods roll when the created Secrets change" has "$w" 'checksum/secrets: [0-9a-f]{64}'
check "tls: runs as non-root" no_root "$w"

if render tls_existing --set tls.enabled=true --set tls.existingSecret=shop-tls \
    --set auth.enabled=true --set auth.existingSecret=shop-token --set auth.secretKey=bearer \
    --set probes.mode=grpc; then
    pass "render tls+auth with existing Secrets"
else
    fail "render tls+auth with existing Secrets: $(cat "$work/tls_existing.err")"
fi
f="$work/tls_existing.yaml"
w="$work/tls_existing.workload.yaml"
check "existing Secrets: none created" is_count "$f" Secret 0
check "existing Secrets: TLS volume uses shop-tls" has "$w" 'secretName: shop-tls$'
check "existing Secrets: token volume maps key bearer to file token" \
    grep -Pzq 'secretName: shop-token\n\s+defaultMode: 0?440\n\s+items:\n\s+- key: bearer\n\s+path: token' "$w"
check "existing Secrets: probes.mode grpc is honoured" probes_are "$w" grpc
check "existing Secrets: no checksum annotation" lacks "$w" 'checksum/secrets'

# ---- persistence: StatefulSet with a claim per replica, HPA, ServiceMonitor ------------
if render persist -f "$chart/ci/persistence-values.yaml"; then pass "render persistence"; else fail "render persistence: $(cat "$work/persist.err")"; fi
f="$work/persist.yaml"
w="$work/persist.workload.yaml"
check "persistence: a StatefulSet" is_count "$f" StatefulSet 1
check "persistence: no Deployment" is_count "$f" Deployment 0
check "persistence: --data-dir /var/lib/affinity" arg_pair "$w" --data-dir /var/lib/affinity
check "persistence: data volume mounted at /var/lib/affinity" \
    grep -Pzq 'name: data\n\s+mountPath: /var/lib/affinity' "$w"
check "persistence: volumeClaimTemplates named data" in_block "$w" volumeClaimTemplates 'name: data$'
check "persistence: claim size 50Gi" in_block "$w" volumeClaimTemplates 'storage: 50Gi$'
check "persistence: storageClassName fast-ssd" in_block "$w" volumeClaimTemplates 'storageClassName: fast-ssd$'
check "persistence: claim is ReadWriteOnce" in_block "$w" volumeClaimTemplates '- ReadWriteOnce$'
check "persistence: serviceName is the headless Service" has "$w" '^  serviceName: rel-affinity-headless$'
check "persistence: headless Service rendered" has "$f" 'name: rel-affinity-headless$'
check "persistence: replicas left to the HPA" lacks "$w" '^  replicas:'
check "persistence: HPA scales the StatefulSet" \
    grep -Pzq 'scaleTargetRef:\n\s+apiVersion: apps/v1\n\s+kind: StatefulSet\n\s+name: rel-affinity' "$f"
check "persistence: HPA has the CPU target and the queue-depth metric" \
    bash -c "grep -q 'averageUtilization: 60' '$f' && grep -q 'name: affinity_queue_depth' '$f'"
check "persistence: ServiceMonitor scrapes /metrics on port metrics" \
    grep -Pzq 'endpoints:\n\s+- port: metrics\n\s+path: /metrics' "$f"
check "persistence: ServiceMonitor skips the headless Service" \
    grep -Pzq 'key: affinity-service-headless\n\s+operator: DoesNotExist' "$f"
check "persistence: ServiceMonitor carries the release label" \
    bash -c "awk '/^kind: ServiceMonitor\$/,/^spec:/' '$f' | grep -q 'release: prometheus'"
check "persistence: gRPC probes on 50051" probes_are "$w" grpc
check "persistence: runs as non-root (fsGroup owns the volume)" \
    bash -c "grep -q 'fsGroup: 10001' '$w'"

if render existing_claim --set persistence.enabled=true --set persistence.existingClaim=shop-data; then
    pass "render persistence with an existing claim"
else
    fail "render persistence with an existing claim: $(cat "$work/existing_claim.err")"
fi
w="$work/existing_claim.workload.yaml"
check "existing claim: mounted as a volume" grep -Pzq 'persistentVolumeClaim:\n\s+claimName: shop-data' "$w"
check "existing claim: no claim template" lacks "$w" volumeClaimTemplates

render nometrics --set metrics.enabled=false || true
w="$work/nometrics.workload.yaml"
check "metrics off: no --metrics-listen flag" bash -c "! grep -q -- '--metrics-listen' '$w'"
check "metrics off: AFFINITY_METRICS_LISTEN emptied (the image sets it)" \
    grep -Pzq 'name: AFFINITY_METRICS_LISTEN\n\s+value: ""' "$w"
check "metrics off: no metrics port on the Service" bash -c "! grep -q 'name: metrics' '$work/nometrics.yaml'"
check "metrics on: AFFINITY_METRICS_LISTEN left to the flag" lacks "$work/default.workload.yaml" AFFINITY_METRICS_LISTEN

# NOTES.txt is rendered only by install; --dry-run=client needs no cluster.
notes() { "$helm_bin" install rel "$chart" --dry-run=client --namespace shop "$@" 2>&1 | sed -n '/^NOTES:/,$p'; }
notes -f "$chart/ci/default-values.yaml" >"$work/notes_default.txt"
check "NOTES: grpcurl health check in plaintext" has "$work/notes_default.txt" 'grpcurl -plaintext -import-path proto -proto grpc/health/v1/health.proto'
check "NOTES: calls affinity.v1.Affinity/Recommend" has "$work/notes_default.txt" 'localhost:50051 affinity.v1.Affinity/Recommend'
check "NOTES: port-forward to the Service" has "$work/notes_default.txt" 'kubectl -n shop port-forward svc/rel-affinity 50051:50051'
notes -f "$chart/ci/tls-auth-values.yaml" >"$work/notes_tls.txt"
check "NOTES (TLS+auth): reads the token from the Secret and sends it" \
    bash -c "grep -q 'get secret rel-affinity-auth' '$work/notes_tls.txt' && grep -q 'authorization: Bearer' '$work/notes_tls.txt'"
check "NOTES (TLS+auth): grpcurl over TLS" has "$work/notes_tls.txt" 'grpcurl -insecure '
notes -f "$chart/ci/gpu-values.yaml" >"$work/notes_gpu.txt"
check "NOTES (2 replicas): explains that writes go to every pod" has "$work/notes_gpu.txt" 'Send writes'
check "NOTES (2 replicas): names the headless Service" has "$work/notes_gpu.txt" 'dns:///rel-affinity-headless.shop.svc:50051'

# ---- derived values ---------------------------------------------------------------------
render grace --set server.graceSeconds=60 --set lifecycle.preStopSleepSeconds=10 || true
check "grace: terminationGracePeriodSeconds follows --grace-seconds (10 + 60 + 5)" \
    has "$work/grace.workload.yaml" '^ *terminationGracePeriodSeconds: 75$'
check "grace: --grace-seconds 60" arg_pair "$work/grace.workload.yaml" --grace-seconds 60
render digest --set image.digest=sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef || true
check "image digest wins over the tag" has "$work/digest.workload.yaml" 'image: "affinityd@sha256:0123456789abcdef'

# ---- values the schema or the templates refuse ------------------------------------------
# reject DESCRIPTION EXPECTED-ERROR-REGEX helm-args...: rendering fails with that message.
reject() {
    local desc="$1" want="$2"
    shift 2
    if "$helm_bin" template rel "$chart" "$@" >"$work/reject.out" 2>"$work/reject.err"; then
        fail "$desc (rendered without error)"
    elif grep -Eq -- "$want" "$work/reject.err"; then
        pass "$desc"
    else
        fail "$desc (unexpected error: $(head -c 300 "$work/reject.err"))"
    fi
}
reject "schema rejects replicaCount: \"three\"" 'replicaCount.*want integer' --set-string replicaCount=three
printf 'replicaCount: "three"\n' >"$work/three.yaml"
reject "schema rejects replicaCount: \"three\" from a values file" 'replicaCount.*want integer' -f "$work/three.yaml"
reject "schema rejects gpu.enabled: \"yes\"" 'gpu/enabled.*want boolean' --set-string gpu.enabled=yes
reject "schema rejects a misspelt key (gpu.enable)" "additional properties 'enable'" --set gpu.enable=true
reject "schema rejects server.logLevel verbose" 'logLevel' --set server.logLevel=verbose
reject "schema rejects server.backend tpu" 'backend' --set server.backend=tpu
reject "schema rejects ports.grpc 70000" 'ports/grpc' --set ports.grpc=70000
reject "schema rejects persistence.size as a list" 'persistence/size' --set 'persistence.size={1,2}'
reject "templates refuse TLS without a Secret or cert/key" 'tls.enabled needs' --set tls.enabled=true
reject "templates refuse auth without a Secret or token" 'auth.enabled needs' --set auth.enabled=true
reject "templates refuse HTTP probes without metrics" 'need metrics.enabled' --set probes.mode=http --set metrics.enabled=false
reject "templates refuse one existing claim for two replicas" 'existingClaim' \
    --set persistence.enabled=true --set persistence.existingClaim=x --set replicaCount=2
reject "templates refuse --backend gpu without gpu.enabled" 'backend gpu needs gpu.enabled' \
    --set gpu.enabled=false --set server.backend=gpu


# ---- container image: the Dockerfile agrees with the chart ------------------------------
# No Docker engine runs here; these check the Dockerfile's text against the chart's
# assumptions, and run its package-discovery step on a local binary.
# ---- replication: replicas as a Deployment sharing a NATS JetStream write log ----
if render repl -f "$chart/ci/replication-values.yaml"; then pass "render replication"; else fail "render replication: $(cat "$work/repl.err")"; fi
f="$work/repl.yaml"
w="$work/repl.workload.yaml"
check "replication: a Deployment, no StatefulSet" is_count "$f" Deployment 1
check "replication: replicas 3" has "$w" '^  replicas: 3$'
check "replication: --log nats://nats.nats.svc:4222" arg_pair "$w" --log nats://nats.nats.svc:4222
check "replication: --log-replicas 3" arg_pair "$w" --log-replicas 3
check "replication: --log-ack applied" arg_pair "$w" --log-ack applied
check "replication: --log-apply-nice 0 (no CAP_SYS_NICE in the default securityContext)" arg_pair "$w" --log-apply-nice 0
check "replication: --bootstrap-from the Service" arg_pair "$w" --bootstrap-from affinity-ci:50051
check "replication: --log-token-file from the log Secret" arg_pair "$w" --log-token-file /etc/affinity/log/token
check "replication: --data-dir on the local emptyDir" arg_pair "$w" --data-dir /var/lib/affinity
check "replication: the log Secret is mounted" in_block "$w" volumeMounts 'mountPath: /etc/affinity/log'
check "replication: the chart creates the log Secret" has "$f" 'name: rel-affinity-log$'
check "replication: --log-user from log.credentials.user" arg_pair "$w" --log-user affinity
check "replication: --log-password-file from the log Secret" arg_pair "$w" --log-password-file /etc/affinity/log/password
check "replication: the log Secret holds the password" has "$f" "password: \"$(printf ci-nats-password | base64)\""
check "replication: --log-tls-ca from log.tls" arg_pair "$w" --log-tls-ca /etc/affinity/log-tls/ca.crt
check "replication: --log-tls-cert for mutual TLS" arg_pair "$w" --log-tls-cert /etc/affinity/log-tls/tls.crt
check "replication: --log-tls-key for mutual TLS" arg_pair "$w" --log-tls-key /etc/affinity/log-tls/tls.key
check "replication: the log TLS Secret is mounted" in_block "$w" volumeMounts 'mountPath: /etc/affinity/log-tls'
check "replication: the log TLS Secret is the existing one" has "$w" 'secretName: nats-client-tls'
check "replication: readiness is the gRPC health probe (SERVING once caught up)" probes_are "$w" grpc
refute "replication: log.enabled without log.urls is refused" "$helm_bin" template t "$chart" --set log.enabled=true
refute "replication: log.ack other than applied|committed is refused" "$helm_bin" template t "$chart" --set log.enabled=true --set log.urls=nats://n:4222 --set log.ack=never
refute "replication: log.credentials.user without a password is refused" "$helm_bin" template t "$chart" --set log.enabled=true --set log.urls=nats://n:4222 --set log.credentials.user=u
refute "replication: log.tls.certKey without keyKey is refused" "$helm_bin" template t "$chart" --set log.enabled=true --set log.urls=nats://n:4222 --set log.tls.existingSecret=s --set log.tls.certKey=tls.crt
refute "replication: log.bootstrapFrom without auth is refused" "$helm_bin" template t "$chart" --set log.enabled=true --set log.urls=nats://n:4222 --set log.bootstrapFrom=x:1

dockerfile="$repo/Dockerfile"
check "Dockerfile: builds on nvidia/cuda devel" has "$dockerfile" '^FROM nvidia/cuda:\$\{CUDA_VERSION\}-devel-\$\{UBUNTU\} AS build$'
check "Dockerfile: runs on the matching nvidia/cuda runtime" has "$dockerfile" '^FROM nvidia/cuda:\$\{CUDA_VERSION\}-runtime-\$\{UBUNTU\} AS runtime$'
check "Dockerfile: installs build deps with scripts/install-deps.sh (as CI does)" \
    bash -c "grep -q '^COPY scripts/install-deps.sh ' '$dockerfile' && grep -q '^RUN bash scripts/install-deps.sh' '$dockerfile'"
check "Dockerfile: builds with cmake and the CUDA backend" has "$dockerfile" 'cmake -S \. -B /build .*-DAFFINITY_GPU=ON'
image_user="$(awk '$1 == "USER" {u = $2} END {print u}' "$dockerfile")"
chart_user="$(awk '/^podSecurityContext:/ {p = 1} p && /runAsUser:/ {print $2; exit}' "$chart/values.yaml")"
check "Dockerfile: final USER is not root" bash -c "[ -n '$image_user' ] && [ '${image_user%%:*}' != 0 ] && [ '${image_user%%:*}' != root ]"
check "Dockerfile: USER uid ($image_user) is the chart's runAsUser ($chart_user)" [ "${image_user%%:*}" = "$chart_user" ]
check "Dockerfile: the user is created with that uid" has "$dockerfile" "useradd .*--uid $chart_user "
check "Dockerfile: EXPOSE 50051 9090 (the chart's ports)" has "$dockerfile" '^EXPOSE 50051 9090$'
check "Dockerfile: ENTRYPOINT is affinityd" has "$dockerfile" '^ENTRYPOINT \["/usr/local/bin/affinityd"\]$'
check "Dockerfile: affinityd is installed where ENTRYPOINT looks" has "$dockerfile" 'install -D -m 0755 /build/src/affinityd /out/usr/local/bin/affinityd'
check "Dockerfile: CUDA JIT cache on /tmp (read-only root filesystem)" has "$dockerfile" 'CUDA_CACHE_PATH=/tmp/cuda-cache'
check "install-deps.sh: valid bash" bash -n "$repo/scripts/install-deps.sh"
check "install-deps.sh: has libmicrohttpd-dev (metrics) and unzip (install-helm.sh)" \
    bash -c "grep -q 'libmicrohttpd-dev' '$repo/scripts/install-deps.sh' && grep -qw unzip '$repo/scripts/install-deps.sh'"
# The build context must keep what the build stage reads.
dockerignore_keeps() {
    local path
    for path in CMakeLists.txt src proto include kernels cmake scripts; do
        grep -Eq "^/?$path/?\$" "$repo/.dockerignore" && return 1
    done
    grep -Eq '^\.git/?$' "$repo/.dockerignore"
}
check ".dockerignore: keeps sources and scripts, drops .git" dockerignore_keeps
# Run the Dockerfile's ldd -> dpkg -S step on /bin/ls: it must name the package of libc.
package_step() {
    local dir="$work/image"
    mkdir -p "$dir/out/usr/local/bin"
    cp /bin/ls "$dir/out/usr/local/bin/affinityd"
    cp /bin/ls "$dir/out/usr/local/bin/affinity"
    awk '/^RUN libs=/ {p = 1} p {print} p && /cat \/out\/runtime-packages.txt/ {exit}' "$dockerfile" |
        sed -e 's/^RUN //' -e "s#/out/#$dir/out/#g" | sed -e ':a' -e '/\\$/N; s/\\\n/ /; ta' >"$dir/step.sh"
    bash -o pipefail "$dir/step.sh" >/dev/null 2>&1 && grep -Eq '^libc6(:[a-z0-9]+)?$' "$dir/out/runtime-packages.txt"
}
if command -v dpkg >/dev/null; then
    check "Dockerfile: runtime package discovery (ldd + dpkg -S) names libc6 for /bin/ls" package_step
fi

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
