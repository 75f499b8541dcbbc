#!/usr/bin/env python3
"""Checks the Helm chart in helm/sandboxd without a cluster or a helm binary.

Helm's own Go SDK (through helm-python-sdk) lints and renders the chart with the default values,
with every option on (values-all-on.yaml) and with the alternative branches; kubernetes-validate
checks every rendered manifest against the newest Kubernetes schemas it ships (strict: unknown
fields fail); yamllint checks the values files. The remaining tests pin what the chart must do for
sandboxd to work on a node. Run: python3 tests/helm/test_chart.py
"""

from __future__ import annotations

import re
import sys
import tomllib
import traceback
from pathlib import Path
from typing import Any, Callable

import helm_python as helm
import kubernetes_validate
import yaml
from yamllint import linter as yamllint_linter
from yamllint.config import YamlLintConfig

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "sandboxd"
ALL_ON = Path(__file__).resolve().parent / "values-all-on.yaml"
CONFIG_RS = ROOT / "src" / "config.rs"
NET_RS = (ROOT / "src" / "net" / "mod.rs", ROOT / "src" / "net" / "cni.rs")
RELEASE = "sandboxd"
NAMESPACE = "sandboxd-system"
GRPC_PORT = 7878
# The oldest Kubernetes the chart must validate against; the newest the package knows is used.
MIN_KUBE = (1, 30)

# Branches neither the defaults nor values-all-on.yaml take: a socket outside containerd's state
# dir, an idle init and an exec output relay binary the node provides outside the data dir and
# network settings left to sandboxd.
ALTERNATIVE = {
    "containerd": {
        "address": "/run/k3s/containerd/containerd.sock",
        "root": "/var/lib/rancher/k3s/agent/containerd",
        "state": "/run/containerd",
    },
    "idleInit": {"path": "/usr/local/bin/catatonit", "installFromImage": False},
    "execIoRelay": {"enabled": True, "path": "/usr/local/bin/sandboxd", "installFromImage": False},
    "metrics": {"enabled": False, "port": 9090},
    "networkPolicy": {"enabled": False},
    "serviceAccount": {"create": False},
    "network": {"bridgeName": "", "bridgeSubnet": "", "dnsFallback": []},
}
HOST_NETWORK = {"network": {"hostNetwork": True}}
# The one choice the chart makes its user make: how callers authenticate (it refuses to render a
# listen on every address without). Merged into every render unless the values name `auth`.
AUTH = {"auth": {"tenants": {"secretName": "sandboxd-tenants", "key": "tenants.toml"}}}


def kube_version() -> str:
    latest = kubernetes_validate.latest_version()
    major, minor = (int(p) for p in latest.split(".")[:2])
    assert (major, minor) >= MIN_KUBE, f"kubernetes-validate {latest} is older than {MIN_KUBE}"
    return f"{major}.{minor}.0"


def all_on_values() -> dict[str, Any]:
    return yaml.safe_load(ALL_ON.read_text())


def with_auth(values: dict[str, Any] | None) -> dict[str, Any]:
    """`values` with [AUTH] unless they say how callers authenticate themselves."""
    values = dict(values or {})
    return values if "auth" in values else {**AUTH, **values}


def render(values: dict[str, Any] | None = None, auth: bool = True) -> dict[str, str]:
    """Template path -> rendered text, like `helm template` (schema checked); with [AUTH] merged
    in unless `auth` is false."""
    chart = helm.Chart.load(str(CHART))
    values = with_auth(values) if auth else values
    return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def manifests(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    docs = []
    for path, text in sorted(render(values).items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append(doc)
    return docs


def one(docs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = [
        d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)
    ]
    if name_suffix == "" and kind == "Service":
        found = [d for d in found if not d["metadata"]["name"].endswith("-headless")]
    names = [d["metadata"]["name"] for d in found]
    assert len(found) == 1, f"expected one {kind} named *{name_suffix}, got {names}"
    return found[0]


def sandboxd_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    pod = one(docs, "DaemonSet")["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "sandboxd"]
    return container


def config_toml(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return tomllib.loads(one(docs, "ConfigMap")["data"]["config.toml"])


def accepted_config_keys() -> set[str]:
    """The fields of src/config.rs's FileConfig, the TOML file's shape (unknown keys rejected)."""
    source = CONFIG_RS.read_text()
    m = re.search(
        r"#\[serde\(deny_unknown_fields\)\]\s*struct FileConfig\s*\{(.*?)\n\}", source, re.S
    )
    assert m, "src/config.rs no longer has `#[serde(deny_unknown_fields)] struct FileConfig`"
    keys = set(re.findall(r"^\s*(?:pub(?:\([^)]*\))?\s+)?(\w+)\s*:", m.group(1), re.M))
    assert "listen" in keys and "containerd_address" in keys, keys
    return keys


def sandboxd_default(name: str) -> str:
    """The value of `pub const <name>` in src/net/ (a string, or a string slice joined by ",")."""
    for path in NET_RS:
        m = re.search(rf"pub const {name}: [^=]+=\s*(&?\[[^\]]*\]|\"[^\"]*\");", path.read_text())
        if m:
            return ",".join(re.findall(r'"([^"]*)"', m.group(1)))
    raise AssertionError(f"no `pub const {name}` in {[str(p) for p in NET_RS]}")


def schema_refuses(values: dict[str, Any], needle: str) -> None:
    try:
        render(values)
    except helm.HelmValuesError as e:
        assert needle in str(e), f"refused, but the message does not name {needle!r}: {e}"
    else:
        raise AssertionError(f"rendering with {values} was accepted")


def template_refuses(
    values: dict[str, Any], needle: str, accepted: str, auth: bool = True
) -> None:
    """Asserts the chart's own checks refuse `values`, naming `needle`; `accepted` is the failure
    message should they pass."""
    try:
        render(values, auth)
    except helm.HelmError as e:
        assert needle in str(e), e
    else:
        raise AssertionError(accepted)


def mount_and_volume(pod: dict[str, Any], container: dict[str, Any], mount_path: str):
    mounts = [m for m in container["volumeMounts"] if m["mountPath"] == mount_path]
    assert len(mounts) == 1, f"no single mount at {mount_path}: {container['volumeMounts']}"
    (volume,) = [v for v in pod["volumes"] if v["name"] == mounts[0]["name"]]
    return mounts[0], volume


def preceding_comment(lines: list[str], index: int) -> str:
    """The comment block right above lines[index] (empty if there is none)."""
    block = []
    i = index - 1
    while i >= 0 and lines[i].strip().startswith("#"):
        block.append(lines[i].strip().lstrip("#").strip())
        i -= 1
    return " ".join(reversed(block))


# --------------------------------------------------------------------------------------------- #


def test_lint_passes_strict_with_defaults_and_all_on():
    for name, values in (("defaults", None), ("all-on", all_on_values()), ("alt", ALTERNATIVE)):
        report = helm.lint(
            str(CHART), with_auth(values), strict=True, kube_version="v" + kube_version()
        )
        assert report["total_charts_linted"] == 1, report
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not report["errors"] and not problems, f"{name}: {report}"


def test_every_rendered_manifest_validates_against_kubernetes_schemas():
    version = kube_version()
    for name, values in (("defaults", None), ("all-on", all_on_values()), ("alt", ALTERNATIVE)):
        docs = manifests(values)
        assert docs, name
        for doc in docs:
            if doc["apiVersion"].startswith("monitoring.coreos.com/"):
                continue  # a CRD: no built-in schema (checked in the ServiceMonitor test)
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                raise AssertionError(
                    f"{name}: {doc['kind']}/{doc['metadata']['name']} invalid for {version}: "
                    f"{e.message} at {list(e.path)}"
                ) from None


def test_values_files_pass_yamllint():
    config = YamlLintConfig(
        "extends: default\n"
        "rules:\n"
        "  document-start: disable\n"
        "  line-length: {max: 100}\n"
    )
    for path in (CHART / "values.yaml", ALL_ON, CHART / "Chart.yaml"):
        problems = list(yamllint_linter.run(path.read_text(), config, str(path)))
        assert not problems, "\n".join(f"{path}:{p.line}:{p.column} {p.desc}" for p in problems)


def test_grpc_probes_ask_the_health_service_on_7878():
    for values in (None, ALTERNATIVE):
        container = sandboxd_container(manifests(values))
        for probe in ("livenessProbe", "readinessProbe"):
            assert container[probe]["grpc"] == {"port": GRPC_PORT, "service": ""}, container[probe]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["grpc"] == GRPC_PORT, ports
    # Kubernetes' gRPC probes cannot speak TLS: with TLS on they ask /healthz on the metrics port.
    container = sandboxd_container(manifests(all_on_values()))
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}, probe
        assert "grpc" not in container[probe]


def test_sandboxd_listens_where_probes_and_services_point():
    for values in (None, all_on_values()):
        docs = manifests(values)
        assert config_toml(docs)["listen"] == f"0.0.0.0:{GRPC_PORT}"
        for svc in (one(docs, "Service"), one(docs, "Service", "-headless")):
            (grpc,) = [p for p in svc["spec"]["ports"] if p["name"] == "grpc"]
            assert grpc["targetPort"] == "grpc", svc
        container = sandboxd_container(docs)
        assert container["args"] == ["serve", "--config", "/etc/sandboxd/config.toml"]
        assert {"name": "config", "mountPath": "/etc/sandboxd", "readOnly": True} in container[
            "volumeMounts"
        ]


def test_containerd_socket_is_mounted_from_the_node_at_the_same_path():
    for values in (None, all_on_values(), ALTERNATIVE):
        docs = manifests(values)
        pod = one(docs, "DaemonSet")["spec"]["template"]["spec"]
        container = sandboxd_container(docs)
        socket = config_toml(docs)["containerd_address"]
        # The socket's directory, not the file: containerd recreates the socket on restart.
        mount, volume = mount_and_volume(pod, container, str(Path(socket).parent))
        assert volume["hostPath"] == {"path": mount["mountPath"], "type": "Directory"}, volume
        assert mount.get("readOnly") is not True
    alt = manifests(ALTERNATIVE)
    pod = one(alt, "DaemonSet")["spec"]["template"]["spec"]
    container = sandboxd_container(alt)
    assert config_toml(alt)["containerd_address"] == "/run/k3s/containerd/containerd.sock"
    for path in ("/run/containerd", "/var/lib/rancher/k3s/agent/containerd"):
        mount, volume = mount_and_volume(pod, container, path)
        assert volume["hostPath"]["path"] == path and mount["mountPropagation"] == "HostToContainer"


def test_node_paths_are_mounted_with_the_propagation_sandboxd_needs():
    docs = manifests()
    pod = one(docs, "DaemonSet")["spec"]["template"]["spec"]
    container = sandboxd_container(docs)
    toml = config_toml(docs)
    expected = {
        # path: (mountPropagation, readOnly, hostPath type)
        toml["data_dir"]: ("Bidirectional", None, "DirectoryOrCreate"),
        toml["netns_dir"]: ("Bidirectional", None, "DirectoryOrCreate"),
        "/run/containerd": ("HostToContainer", None, "Directory"),
        "/var/lib/containerd": ("HostToContainer", None, "Directory"),
        "/sys/fs/cgroup": (None, None, "Directory"),
        "/opt/cni/bin": (None, True, "DirectoryOrCreate"),
        "/etc/cni/net.d": (None, True, "DirectoryOrCreate"),
    }
    for path, (propagation, read_only, kind) in expected.items():
        mount, volume = mount_and_volume(pod, container, path)
        assert volume["hostPath"] == {"path": path, "type": kind}, (path, volume)
        assert mount.get("mountPropagation") == propagation, (path, mount)
        assert mount.get("readOnly") == read_only, (path, mount)
    assert toml["netns_dir"] == "/run/sandboxd/netns", toml
    assert not [m for m in container["volumeMounts"] if m["mountPath"] == "/run/xtables.lock"]
    # A custom netns dir moves both the mount and the key (runc opens the files by that path).
    on = manifests(all_on_values())
    on_pod = one(on, "DaemonSet")["spec"]["template"]["spec"]
    on_toml = config_toml(on)
    assert on_toml["netns_dir"] == "/run/sandboxd-prod/netns", on_toml
    mount, volume = mount_and_volume(on_pod, sandboxd_container(on), on_toml["netns_dir"])
    assert volume["hostPath"] == {"path": on_toml["netns_dir"], "type": "DirectoryOrCreate"}
    assert mount["mountPropagation"] == "Bidirectional", mount
    template_refuses(
        {"network": {"netnsDir": "/var/lib/sandboxd/"}},
        "network.netnsDir (/var/lib/sandboxd) must differ from dataDir",
        "a netns dir on the data dir (a duplicate mount path) was accepted",
    )


def test_privileges_are_set_and_each_one_says_why():
    for values in (None, all_on_values()):
        docs = manifests(values)
        pod = one(docs, "DaemonSet")["spec"]["template"]["spec"]
        container = sandboxd_container(docs)
        assert pod["hostPID"] is True
        assert pod["automountServiceAccountToken"] is False
        assert container["securityContext"]["privileged"] is True
        assert container["securityContext"]["runAsUser"] == 0
        for init in pod.get("initContainers", []):
            assert init["securityContext"]["allowPrivilegeEscalation"] is False, init
            assert init["securityContext"]["capabilities"] == {"drop": ["ALL"]}, init
    lines = (CHART / "templates" / "daemonset.yaml").read_text().splitlines()
    why = {
        "privileged: true": ("mount", "cgroup", "setns"),
        "hostPID: true": ("/proc/", "PID namespace"),
        "runAsUser: 0": ("root",),
        "hostNetwork: true": ("node's network namespace", "NetworkPolicy"),
        "mountPropagation: Bidirectional": ("Bidirectional",),
        "mountPropagation: HostToContainer": ("HostToContainer",),
    }
    for setting, words in why.items():
        hits = [i for i, line in enumerate(lines) if line.strip() == setting]
        assert hits, f"{setting} is not in templates/daemonset.yaml"
        for i in hits:
            # The comment sits right above the setting or, for a mount's propagation, above the
            # volumeMounts item it belongs to.
            j = i
            if setting.startswith("mountPropagation"):
                while j > 0 and not lines[j].lstrip().startswith("- "):
                    j -= 1
            comment = preceding_comment(lines, j)
            assert comment, f"line {i + 1} ({setting}) has no comment saying why"
            missing = [w for w in words if w not in comment]
            assert not missing, f"line {i + 1} ({setting}): comment lacks {missing}: {comment!r}"


def test_pod_network_is_the_pods_own_unless_host_network_is_asked_for():
    pod = one(manifests(), "DaemonSet")["spec"]["template"]["spec"]
    assert "hostNetwork" not in pod and "dnsPolicy" not in pod, pod
    for values in (HOST_NETWORK, all_on_values()):
        docs = manifests(values)
        pod = one(docs, "DaemonSet")["spec"]["template"]["spec"]
        assert pod["hostNetwork"] is True, pod
        # Without it a host-network pod resolves with the node's resolv.conf, not the cluster DNS.
        assert pod["dnsPolicy"] == "ClusterFirstWithHostNet", pod
        # iptables-legacy in the node's namespace must share the node's lock with kube-proxy.
        mount, volume = mount_and_volume(pod, sandboxd_container(docs), "/run/xtables.lock")
        assert volume["hostPath"] == {"path": "/run/xtables.lock", "type": "FileOrCreate"}
        assert mount.get("readOnly") is not True, mount
    notes = render(HOST_NETWORK)["sandboxd/templates/NOTES.txt"]
    assert "network.hostNetwork is true" in notes and "NetworkPolicy" in notes, notes
    assert "gRPC port 7878, metrics port 9090" in notes, notes
    assert "network.hostNetwork is true" not in render()["sandboxd/templates/NOTES.txt"]


def test_network_values_reach_config_toml_with_sandboxds_defaults():
    default = config_toml(manifests())
    assert default["netns_dir"] == sandboxd_default("DEFAULT_NETNS_DIR")
    assert default["bridge_name"] == sandboxd_default("DEFAULT_BRIDGE")
    assert default["bridge_subnet"] == sandboxd_default("DEFAULT_SUBNET")
    assert default["dns_fallback"] == sandboxd_default("DEFAULT_DNS_FALLBACK")
    # The node's plugins (the mounted cni.binDir) first, then the image's.
    assert default["cni_plugin_dirs"] == "/opt/cni/bin:/usr/lib/cni", default
    assert "cni_conflist" not in default, default
    on = config_toml(manifests(all_on_values()))
    assert on["cni_conflist"] == "/etc/cni/net.d/sandboxd/sandboxd-prod.conflist", on
    assert on["cni_plugin_dirs"] == "/usr/libexec/cni:/usr/lib/cni", on
    assert on["bridge_name"] == "sbx-prod0" and on["bridge_subnet"] == "10.214.0.0/20", on
    assert on["dns_fallback"] == "9.9.9.9,2620:fe::fe", on
    # The conflist must be readable in the pod: here it lies under the mounted cni.confDir.
    docs = manifests(all_on_values())
    container = sandboxd_container(docs)
    (conf,) = [m for m in container["volumeMounts"] if m["name"] == "cni-conf"]
    assert on["cni_conflist"].startswith(conf["mountPath"] + "/") and conf["readOnly"] is True
    # Empty values leave the key out, so sandboxd's own default applies.
    alt = config_toml(manifests(ALTERNATIVE))
    assert not {"bridge_name", "bridge_subnet", "dns_fallback", "cni_conflist"} & set(alt), alt


def test_configmap_toml_parses_and_holds_only_keys_sandboxd_accepts():
    accepted = accepted_config_keys()
    chart_keys = {
        "listen", "containerd_address", "namespace", "data_dir", "cgroup_parent",
        "embedded_containerd", "idle_init", "log_format", "netns_dir", "cni_plugin_dirs",
        "exec_io_relay",
    }
    chart_keys |= {
        "seccomp_profile", "oom_score_adj", "default_memory", "default_cpu_millis",
        "default_pids", "min_free_disk", "stream_idle_timeout", "max_streams_per_tenant",
        "exec_sync_memory",
    }
    network_keys = {"bridge_name", "bridge_subnet", "dns_fallback"}
    auth_keys = {"tls_cert", "tls_key", "tls_client_ca", "tenants", "trust_forwarded_client_cert"}
    cases = (
        (None, chart_keys | network_keys | {"metrics_listen", "tenants"}),
        (
            all_on_values(),
            chart_keys | network_keys | auth_keys
            | {"metrics_listen", "cni_conflist", "warm_pool", "total_memory", "total_cpu_millis"},
        ),
        (ALTERNATIVE, chart_keys | {"tenants"}),
    )
    for values, expected in cases:
        toml = config_toml(manifests(values))
        assert set(toml) == expected, sorted(set(toml) ^ expected)
        unknown = set(toml) - accepted
        assert not unknown, f"config.rs rejects {sorted(unknown)}; it accepts {sorted(accepted)}"
        assert toml["embedded_containerd"] == "never"
        flags = {"trust_forwarded_client_cert", "allow_unauthenticated"}
        assert all(isinstance(v, bool) for k, v in toml.items() if k in flags), toml
        assert all(isinstance(v, str) for k, v in toml.items() if k not in flags), toml
    default = config_toml(manifests())
    assert default["containerd_address"] == "/run/containerd/containerd.sock"
    assert default["namespace"] == "sandboxd" and default["data_dir"] == "/var/lib/sandboxd"
    assert default["metrics_listen"] == "0.0.0.0:9090"
    on = config_toml(manifests(all_on_values()))
    assert on["metrics_listen"] == "0.0.0.0:9464" and on["namespace"] == "sandboxd-prod"
    assert on["log_format"] == "human" and on["cgroup_parent"] == "/kubepods.slice/sandboxd"
    assert on["warm_pool"] == "docker.io/library/python:3.12-slim=4,busybox:1.36=2"


def test_walls_and_limits_reach_config_toml():
    default = config_toml(manifests())
    assert {
        k: default[k]
        for k in ("seccomp_profile", "oom_score_adj", "default_memory", "default_cpu_millis",
                  "default_pids", "min_free_disk", "stream_idle_timeout",
                  "max_streams_per_tenant", "exec_sync_memory")
    } == {
        "seccomp_profile": "default", "oom_score_adj": "500", "default_memory": "1Gi",
        "default_cpu_millis": "1000", "default_pids": "1024", "min_free_disk": "5%",
        "stream_idle_timeout": "5m", "max_streams_per_tenant": "1024",
        "exec_sync_memory": "512Mi",
    }, default
    # No cap on all sandboxes together unless one is asked for.
    assert not {"total_memory", "total_cpu_millis"} & set(default), default
    on = config_toml(manifests(all_on_values()))
    assert on["seccomp_profile"] == "unconfined" and on["oom_score_adj"] == "-100", on
    assert on["total_memory"] == "48Gi" and on["total_cpu_millis"] == "30000", on
    assert on["min_free_disk"] == "20Gi" and on["default_memory"] == "0", on
    assert on["stream_idle_timeout"] == "90s" and on["exec_sync_memory"] == "1Gi", on


def test_idle_init_exists_on_the_node_where_runc_and_sandboxd_look():
    docs = manifests()
    pod = one(docs, "DaemonSet")["spec"]["template"]["spec"]
    toml = config_toml(docs)
    (init,) = pod["initContainers"]
    assert init["name"] == "install-idle-init", init
    assert init["command"][-2:] == ["/usr/bin/catatonit", toml["idle_init"]], init["command"]
    assert toml["idle_init"].startswith(toml["data_dir"] + "/")
    assert init["volumeMounts"] == [{"name": "data", "mountPath": toml["data_dir"]}]
    alt = manifests(ALTERNATIVE)
    pod = one(alt, "DaemonSet")["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    mount, volume = mount_and_volume(pod, sandboxd_container(alt), "/usr/local/bin/catatonit")
    assert volume["hostPath"] == {"path": "/usr/local/bin/catatonit", "type": "File"}
    assert mount["readOnly"] is True
    schema_ok_but_refused = {"idleInit": {"path": "/opt/catatonit", "installFromImage": True}}
    template_refuses(
        schema_ok_but_refused,
        "must be under dataDir",
        "an idle init copied outside the data dir was accepted",
    )


def test_exec_io_relay_is_off_by_default_and_on_the_node_when_on():
    # Off by default: a binary the node cannot run fails an exec (INTERNAL after 5 s), and
    # sandboxd's own default ("auto", its path in the pod) means nothing to the node's shim.
    docs = manifests()
    pod = one(docs, "DaemonSet")["spec"]["template"]["spec"]
    assert config_toml(docs)["exec_io_relay"] == "off"
    assert [c["name"] for c in pod["initContainers"]] == ["install-idle-init"], pod
    # On: the shim runs the copied binary by the configured path, under the hostPath data dir
    # (mounted at the same path), copied from the image beside and renamed over.
    on = manifests(all_on_values())
    pod = one(on, "DaemonSet")["spec"]["template"]["spec"]
    toml = config_toml(on)
    relay = all_on_values()["execIoRelay"]
    assert toml["exec_io_relay"] == relay["path"], toml
    assert toml["exec_io_relay"].startswith(toml["data_dir"] + "/")
    inits = {c["name"]: c for c in pod["initContainers"]}
    assert set(inits) == {"install-idle-init", "install-exec-io-relay"}, inits
    init = inits["install-exec-io-relay"]
    assert init["command"][-2:] == [relay["imagePath"], toml["exec_io_relay"]], init["command"]
    assert 'cp "$1" "$2.new"' in init["command"][2] and 'mv -f "$2.new" "$2"' in init["command"][2]
    assert init["volumeMounts"] == [{"name": "data", "mountPath": toml["data_dir"]}]
    assert init["image"] == sandboxd_container(on)["image"], init
    mount, volume = mount_and_volume(pod, sandboxd_container(on), toml["data_dir"])
    assert volume["hostPath"]["path"] == toml["data_dir"], volume
    # The node provides it: no copy, and nothing to mount (sandboxd only names it to the shim).
    alt = manifests(ALTERNATIVE)
    pod = one(alt, "DaemonSet")["spec"]["template"]["spec"]
    assert config_toml(alt)["exec_io_relay"] == "/usr/local/bin/sandboxd"
    assert "initContainers" not in pod
    mounts = [m["mountPath"] for m in sandboxd_container(alt)["volumeMounts"]]
    assert "/usr/local/bin/sandboxd" not in mounts, mounts
    # Schema-valid, but copied outside the data dir (not on the node) or over other files.
    outside = {"execIoRelay": {"enabled": True, "path": "/opt/sandboxd", "installFromImage": True}}
    template_refuses(
        outside,
        "execIoRelay.path (/opt/sandboxd) must be under dataDir",
        "an exec relay binary copied outside the data dir was accepted",
    )
    disabled = {"execIoRelay": dict(outside["execIoRelay"], enabled=False)}
    assert config_toml(manifests(disabled))["exec_io_relay"] == "off"
    for path, other in (
        ("/var/lib/sandboxd/bin/catatonit", "idleInit.path"),
        ("/var/lib/sandboxd/exec-relay.sock", "the relay socket"),
    ):
        template_refuses(
            {"execIoRelay": {"enabled": True, "path": path, "installFromImage": True}},
            f"execIoRelay.path ({path}) must differ from {other}",
            f"an exec relay binary at {path} ({other}) was accepted",
        )


def test_services_reach_the_local_node_or_one_pod():
    for values in (None, all_on_values()):
        docs = manifests(values)
        pod_labels = one(docs, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
        local = one(docs, "Service")
        headless = one(docs, "Service", "-headless")
        assert local["spec"]["internalTrafficPolicy"] == "Local", local["spec"]
        assert headless["spec"]["clusterIP"] == "None", headless["spec"]
        for svc in (local, headless):
            assert svc["spec"]["selector"].items() <= pod_labels.items(), svc["spec"]["selector"]
    local = one(manifests(all_on_values()), "Service")
    assert [p["port"] for p in local["spec"]["ports"]] == [50051]


def test_networkpolicy_admits_only_the_client_label_by_default():
    docs = manifests()
    policy = one(docs, "NetworkPolicy")
    pod_labels = one(docs, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert spec["policyTypes"] == ["Ingress"]
    assert spec["ingress"] == [
        {
            "from": [{"podSelector": {"matchLabels": {"sandboxd.io/client": "true"}}}],
            "ports": [{"port": "grpc", "protocol": "TCP"}],
        }
    ], spec["ingress"]
    custom = one(
        manifests({"networkPolicy": {"clientLabel": {"key": "team", "value": "agents"}}}),
        "NetworkPolicy",
    )
    assert custom["spec"]["ingress"][0]["from"] == [
        {"podSelector": {"matchLabels": {"team": "agents"}}}
    ]
    on = one(manifests(all_on_values()), "NetworkPolicy")["spec"]["ingress"]
    assert on[0]["from"] == [
        {
            "podSelector": {"matchLabels": {"agents.example.com/sandboxd-client": "allowed"}},
            "namespaceSelector": {"matchLabels": {"sandboxd.io/clients-allowed": "true"}},
        }
    ], on[0]
    assert on[0]["ports"] == [{"port": "grpc", "protocol": "TCP"}]
    assert on[1]["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert on[1]["from"] == all_on_values()["networkPolicy"]["metricsFrom"]
    every_ns = one(
        manifests({"networkPolicy": {"clientNamespaceSelector": {}}}), "NetworkPolicy"
    )["spec"]["ingress"][0]["from"][0]
    assert every_ns["namespaceSelector"] == {}, every_ns
    assert not any(d["kind"] == "NetworkPolicy" for d in manifests(ALTERNATIVE))


def test_notes_and_readme_say_how_callers_authenticate():
    notes = render()["sandboxd/templates/NOTES.txt"]
    assert "bearer tokens" in notes and "sandboxd-tenants" in notes, notes
    assert "second wall" in notes and "sandboxd.io/client" in notes, notes
    tls_notes = render(all_on_values())["sandboxd/templates/NOTES.txt"]
    assert "client certificates" in tls_notes and "(TLS, certificate from Secret sandboxd-tls" in tls_notes, tls_notes
    open_values = {"auth": {**AUTH["auth"], "tenants": {"secretName": "", "key": "t.toml"},
                            "allowUnauthenticated": True}}
    open_notes = render(open_values)["sandboxd/templates/NOTES.txt"]
    assert "WARNING: auth.allowUnauthenticated is true" in open_notes, open_notes
    unwalled = render({"networkPolicy": {"enabled": False}})["sandboxd/templates/NOTES.txt"]
    assert "WARNING: networkPolicy.enabled is false" in unwalled, unwalled
    readme = (CHART / "README.md").read_text()
    for needle in ("auth.tls.secretName", "auth.tenants.secretName", "cert-manager",
                   "trustForwardedClientCert", "allowUnauthenticated", "NetworkPolicy"):
        assert needle in readme, needle


def test_chart_refuses_to_render_an_unauthenticated_listen_unless_told():
    # The bare defaults: sandboxd would listen on every address with nobody authenticating.
    template_refuses({}, "auth.allowUnauthenticated", "the bare defaults rendered", auth=False)
    # TLS alone authenticates nobody.
    tls_only = {"auth": {"tls": {"secretName": "sandboxd-tls", "clientCA": False},
                         "tenants": {"secretName": "", "key": "tenants.toml"},
                         "trustForwardedClientCert": False, "allowUnauthenticated": False}}
    template_refuses(tls_only, "auth.tenants.secretName", "TLS alone rendered")
    said_so = {"auth": {**tls_only["auth"], "allowUnauthenticated": True}}
    toml = config_toml(manifests(said_so))
    assert toml["allow_unauthenticated"] is True and "tenants" not in toml, toml
    client_certs = {"auth": {**tls_only["auth"], "tls": {"secretName": "t", "clientCA": True}}}
    assert "allow_unauthenticated" not in config_toml(manifests(client_certs))
    # Settings that only make sense together.
    template_refuses(
        {"auth": {**AUTH["auth"], "tls": {"secretName": "", "clientCA": True}}},
        "auth.tls.clientCA needs auth.tls.secretName", "clientCA without TLS rendered",
    )
    template_refuses(
        {"auth": {**said_so["auth"], "trustForwardedClientCert": True}},
        "auth.trustForwardedClientCert needs auth.tenants.secretName",
        "a trusted sidecar without a tenants file rendered",
    )
    template_refuses(
        {**client_certs, "metrics": {"enabled": False, "port": 9090}},
        "needs metrics.enabled", "TLS without the /healthz probe port rendered",
    )


def test_tls_and_tenants_come_from_secrets_mounted_whole():
    docs = manifests(all_on_values())
    pod = one(docs, "DaemonSet")["spec"]["template"]["spec"]
    container = sandboxd_container(docs)
    toml = config_toml(docs)
    auth = all_on_values()["auth"]
    # cert-manager's key names, in a Secret mounted whole (a subPath mount never sees renewals).
    assert (toml["tls_cert"], toml["tls_key"], toml["tls_client_ca"]) == (
        "/etc/sandboxd-tls/tls.crt", "/etc/sandboxd-tls/tls.key", "/etc/sandboxd-tls/ca.crt"
    ), toml
    assert toml["tenants"] == f"/etc/sandboxd-tenants/{auth['tenants']['key']}"
    assert toml["trust_forwarded_client_cert"] is True
    for path, secret in (("/etc/sandboxd-tls", auth["tls"]["secretName"]),
                         ("/etc/sandboxd-tenants", auth["tenants"]["secretName"])):
        mount, volume = mount_and_volume(pod, container, path)
        assert mount.get("readOnly") is True and "subPath" not in mount, mount
        assert volume["secret"]["secretName"] == secret, volume
    # Without TLS nothing of it is there.
    default = manifests()
    assert not any(k.startswith("tls_") for k in config_toml(default))
    volumes = [v["name"] for v in one(default, "DaemonSet")["spec"]["template"]["spec"]["volumes"]]
    assert "tls" not in volumes and "tenants" in volumes, volumes


def test_servicemonitor_only_when_enabled_and_scrapes_the_metrics_port():
    assert not any(d["kind"] == "ServiceMonitor" for d in manifests())
    docs = manifests(all_on_values())
    monitor = one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    headless = one(docs, "Service", "-headless")
    local = one(docs, "Service")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= headless["metadata"]["labels"].items()
    assert not selector.items() <= local["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert endpoint["interval"] == "15s" and endpoint["scrapeTimeout"] == "5s"
    (port,) = [p for p in headless["spec"]["ports"] if p["name"] == "metrics"]
    assert port["port"] == 9464 and port["targetPort"] == "metrics"
    container = sandboxd_container(docs)
    assert {"name": "metrics", "containerPort": 9464, "protocol": "TCP"} in container["ports"]
    template_refuses(
        {"serviceMonitor": {"enabled": True}, "metrics": {"enabled": False, "port": 9090}},
        "serviceMonitor.enabled needs metrics.enabled",
        "a ServiceMonitor without metrics was accepted",
    )


def test_metrics_off_leaves_no_metrics_port_or_key():
    docs = manifests({"metrics": {"enabled": False}})
    assert "metrics_listen" not in config_toml(docs)
    assert [p["name"] for p in sandboxd_container(docs)["ports"]] == ["grpc"]
    assert [p["name"] for p in one(docs, "Service", "-headless")["spec"]["ports"]] == ["grpc"]


def test_otlp_endpoint_becomes_the_standard_env_var():
    env = {e["name"]: e for e in sandboxd_container(manifests(all_on_values()))["env"]}
    endpoint = env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"]
    assert endpoint == "http://otel-collector.observability.svc:4317", endpoint
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    default_env = [e["name"] for e in sandboxd_container(manifests())["env"]]
    assert default_env == ["RUST_LOG"], default_env


def test_daemonset_scheduling_values_render():
    on = one(manifests(all_on_values()), "DaemonSet")
    pod = on["spec"]["template"]["spec"]
    assert on["spec"]["updateStrategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "10%"}
    }
    assert pod["tolerations"][0]["key"] == "sandboxd.io/dedicated"
    assert pod["nodeSelector"]["sandboxd.io/enabled"] == "true"
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["serviceAccountName"] == "sandboxd-node"
    assert sandboxd_container([on])["image"] == "registry.example.com/platform/sandboxd:0.2.0"
    assert sandboxd_container([on])["resources"]["limits"]["memory"] == "2Gi"
    default = one(manifests(), "DaemonSet")
    assert sandboxd_container([default])["image"] == "ghcr.io/sandboxd/sandboxd:0.1.0"
    assert default["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    # A config change must roll the pods: sandboxd reads its config once.
    a = default["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    b = one(manifests({"config": {"logFormat": "human"}}), "DaemonSet")
    assert a != b["spec"]["template"]["metadata"]["annotations"]["checksum/config"]


def test_schema_refuses_bad_values():
    schema_refuses({"service": {"port": "x"}}, "/service/port")
    schema_refuses({"service": {"port": 70000}}, "/service/port")
    schema_refuses({"config": {"logFormat": "yaml"}}, "/config/logFormat")
    schema_refuses({"config": {"namespace": "no spaces"}}, "/config/namespace")
    schema_refuses({"config": {"cgroupParent": "/a/../b"}}, "/config/cgroupParent")
    schema_refuses({"dataDir": "relative/dir"}, "/dataDir")
    schema_refuses({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy")
    schema_refuses({"metrics": {"enabled": "yes"}}, "/metrics/enabled")
    schema_refuses({"otlp": {"endpoint": "collector:4317"}}, "/otlp/endpoint")
    label = "/networkPolicy/clientLabel"
    schema_refuses({"networkPolicy": {"clientLabel": {"key": ""}}}, label + "/key")
    schema_refuses({"networkPolicy": {"clientLabel": {"value": "has space"}}}, label + "/value")
    schema_refuses({"execIoRelay": {"enabled": "yes"}}, "/execIoRelay/enabled")
    schema_refuses({"execIoRelay": {"path": "bin/sandboxd"}}, "/execIoRelay/path")
    schema_refuses({"execIoRelay": {"imagePath": "sandboxd"}}, "/execIoRelay/imagePath")
    schema_refuses({"execIoRelay": {"binary": "/usr/bin/sandboxd"}}, "binary")
    schema_refuses({"network": {"hostNetwork": "yes"}}, "/network/hostNetwork")
    schema_refuses({"network": {"netnsDir": "run/netns"}}, "/network/netnsDir")
    schema_refuses({"network": {"conflist": "sandboxd.conflist"}}, "/network/conflist")
    schema_refuses({"network": {"bridgeName": "sandboxd-bridge0"}}, "/network/bridgeName")
    schema_refuses({"network": {"bridgeName": "br 0"}}, "/network/bridgeName")
    for subnet in ("10.213.0.0", "10.213.0.0/31", "300.0.0.0/8", "fd00::/64"):
        schema_refuses({"network": {"bridgeSubnet": subnet}}, "/network/bridgeSubnet")
    for resolver in ("dns.google", "1.1.1", "1.1.1.1/32", "fe80::1%eth0"):
        schema_refuses({"network": {"dnsFallback": [resolver]}}, "/network/dnsFallback/0")
    schema_refuses({"network": {"dnsFallback": "1.1.1.1"}}, "/network/dnsFallback")
    schema_refuses({"walls": {"seccompProfile": "/etc/profile.json"}}, "/walls/seccompProfile")
    schema_refuses({"walls": {"oomScoreAdj": 1001}}, "/walls/oomScoreAdj")
    schema_refuses({"walls": {"defaultPids": 0}}, "/walls/defaultPids")
    schema_refuses({"walls": {"minFreeDisk": "lots"}}, "/walls/minFreeDisk")
    schema_refuses({"walls": {"totalMemory": "8 GB"}}, "/walls/totalMemory")
    schema_refuses({"limits": {"streamIdleTimeout": "5"}}, "/limits/streamIdleTimeout")
    schema_refuses({"limits": {"execSyncMemory": "-1"}}, "/limits/execSyncMemory")
    schema_refuses({"replicas": 3}, "replicas")  # a DaemonSet has none: typos are refused too
    schema_refuses({"auth": {**AUTH["auth"], "allowUnauthenticated": "yes"}},
                   "/auth/allowUnauthenticated")
    schema_refuses({"auth": {"tenants": {"secretName": "Not_A_Name", "key": "t"}}},
                   "/auth/tenants/secretName")
    schema_refuses({"auth": {**AUTH["auth"], "token": "x"}}, "token")
    report = helm.lint(str(CHART), {"config": {"logFormat": "yaml"}})
    assert any("/config/logFormat" in e for e in report["errors"]), report


def main() -> int:
    tests: list[tuple[str, Callable[[], None]]] = [
        (name, fn) for name, fn in globals().items() if name.startswith("test_") and callable(fn)
    ]
    passed = failed = 0
    for name, fn in tests:
        try:
            fn()
        except Exception:  # noqa: BLE001 - every failure is reported, then counted
            failed += 1
            print(f"FAIL {name}")
            traceback.print_exc(file=sys.stdout)
        else:
            passed += 1
            print(f"ok   {name}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
