//! Integration-test fixtures: a private containerd, a local registry holding a busybox image,
//! and the sandboxd binary wired to both. Every fixture is an RAII guard that kills its
//! processes, unmounts and removes its directories on drop, also when the test panics.
//!
//! Tests must run as root with the packages of `scripts/install-deps.sh` installed; fixtures
//! panic (never skip) otherwise.

// Each test crate includes this module and uses a different part of it.
#![allow(dead_code, unused_imports)]

pub mod bridge;
pub mod client;
pub mod containerd;
pub mod host;
pub mod image;
pub mod netns;
pub mod pki;
pub mod registry;
pub mod sandboxd;

pub use client::{Clients, SMALL_LIMITS};
pub use containerd::{namespaced, Containerd, Leaks};
pub use host::{unique_name, CgroupParent};
pub use image::{
    build_busybox_layout, build_layout_layers, build_layout_with, busybox_layout, LayoutInfo,
};
pub use registry::Registry;
pub use sandboxd::{Sandboxd, SandboxdOptions};

use tonic::transport::Channel;

/// Name and tag under which [`TestEnv`] pushes the busybox image.
pub const BUSYBOX_NAME_TAG: &str = "busybox:latest";

/// Everything a sandboxd integration test needs: containerd, a registry serving
/// `busybox:latest`, and sandboxd itself in a namespace and cgroup parent of its own.
///
/// Fields drop in declaration order: sandboxd stops first, then containerd and its shims, then
/// the registry, and last the cgroup parent (whose leftover cgroups are removed).
pub struct TestEnv {
    /// The service under test.
    pub sandboxd: Sandboxd,
    /// The containerd sandboxd talks to.
    pub containerd: Containerd,
    /// The registry holding [`BUSYBOX_NAME_TAG`].
    pub registry: Registry,
    /// The cgroup parent given to sandboxd.
    pub cgroup: CgroupParent,
    /// The containerd namespace given to sandboxd.
    pub namespace: String,
}

impl TestEnv {
    /// Starts containerd, a registry with busybox pushed, and sandboxd (no extra arguments).
    pub async fn new() -> TestEnv {
        TestEnv::with_args(&[]).await
    }

    /// Like [`TestEnv::new`], appending `extra_args` to `sandboxd serve`'s command line.
    pub async fn with_args(extra_args: &[&str]) -> TestEnv {
        TestEnv::with_args_env(extra_args, &[]).await
    }

    /// Like [`TestEnv::with_args`], also setting environment variables for sandboxd.
    pub async fn with_args_env(extra_args: &[&str], extra_env: &[(&str, &str)]) -> TestEnv {
        TestEnv::start(extra_args, extra_env, None).await
    }

    /// Like [`TestEnv::with_args`] for a sandboxd serving TLS (`--tls-cert` and `--tls-key` among
    /// `extra_args`) whose certificate chains to `tls`'s CA.
    pub async fn with_tls(extra_args: &[&str], tls: ::sandboxd::tls::ClientFiles) -> TestEnv {
        TestEnv::start(extra_args, &[], Some(tls)).await
    }

    async fn start(
        extra_args: &[&str],
        extra_env: &[(&str, &str)],
        tls: Option<::sandboxd::tls::ClientFiles>,
    ) -> TestEnv {
        host::require_prerequisites();
        let layout = busybox_layout();
        let containerd = Containerd::start().await;
        let registry = Registry::start();
        registry.push(&layout, BUSYBOX_NAME_TAG);
        let cgroup = CgroupParent::new();
        let namespace = unique_name("sbx-test");
        let sandboxd = Sandboxd::start(SandboxdOptions {
            containerd_address: containerd.address(),
            namespace: namespace.clone(),
            cgroup_parent: cgroup.path().to_owned(),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            extra_env: extra_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            tls,
        })
        .await;
        TestEnv {
            sandboxd,
            containerd,
            registry,
            cgroup,
            namespace,
        }
    }

    /// `127.0.0.1:PORT/busybox:latest`, the reference to pull.
    pub fn image_ref(&self) -> String {
        format!("{}/{BUSYBOX_NAME_TAG}", self.registry.addr())
    }

    /// sandboxd's endpoint, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        self.sandboxd.endpoint()
    }

    /// A connected gRPC channel to sandboxd.
    pub async fn channel(&self) -> Channel {
        self.sandboxd.channel().await
    }

    /// Pushes a layout to the env's registry as `name_tag` and returns its full reference.
    pub fn push_image(&self, layout: &std::path::Path, name_tag: &str) -> String {
        self.registry.push(layout, name_tag);
        format!("{}/{name_tag}", self.registry.addr())
    }

    /// What sandboxd's namespaces (its own and every tenant's) still hold in containerd, plus
    /// cgroups below its parent. Another tenant's leftovers are named `namespace/item`.
    pub async fn leaks(&self) -> Leaks {
        let mut leaks = self.containerd.leaks(&self.namespace).await;
        for ns in self.containerd.sandboxd_namespaces(&self.namespace).await {
            if ns == self.namespace {
                continue;
            }
            let more = self.containerd.leaks(&ns).await;
            let named = |items: Vec<String>| items.into_iter().map(|i| format!("{ns}/{i}"));
            leaks.containers.extend(named(more.containers));
            leaks.tasks.extend(named(more.tasks));
            leaks.active_snapshots.extend(named(more.active_snapshots));
            leaks.leases.extend(named(more.leases));
            leaks.ingests.extend(named(more.ingests));
        }
        leaks.cgroups = self.cgroup.leftovers();
        leaks
    }

    /// The containerd namespace sandboxd gives tenant `tenant` (see the README's tenants
    /// section: `<namespace>.tenant.<tenant>` for a short name).
    pub fn tenant_namespace(&self, tenant: &str) -> String {
        format!("{}.tenant.{tenant}", self.namespace)
    }

    /// Ids of the unclaimed warm-pool sandboxes sandboxd keeps in containerd.
    pub async fn pooled(&self) -> std::collections::BTreeSet<String> {
        self.containerd
            .container_ids(&self.namespace, vec!["labels.\"sandboxd.io/pool\"".into()])
            .await
            .into_iter()
            .collect()
    }

    /// Panics, listing them, if any container, task, active snapshot, lease or cgroup remains.
    pub async fn leak_check(&self) {
        let leaks = self.leaks().await;
        assert!(
            leaks.is_empty(),
            "resources leaked after the test:\n{leaks}"
        );
    }
}
