//! The gRPC clients of one sandboxd and the calls most tests make through them, so that a test
//! reads as the behaviour it pins rather than as request boilerplate.
//!
//! Helpers named after an RPC panic (naming the sandbox and the status) when it fails; the
//! `try_` ones return the status for tests that check it.

use sandboxd::pb;
use sandboxd::pb::file_service_client::FileServiceClient;
use sandboxd::pb::sandbox_service_client::SandboxServiceClient;
use sandboxd::pb::snapshot_service_client::SnapshotServiceClient;
use tonic::transport::Channel;
use tonic::Status;

use super::TestEnv;

/// SandboxService, FileService and SnapshotService clients sharing one channel, plus the image
/// new sandboxes start from.
#[derive(Clone)]
pub struct Clients {
    /// SandboxService.
    pub sb: SandboxServiceClient<Channel>,
    /// FileService.
    pub fs: FileServiceClient<Channel>,
    /// SnapshotService.
    pub snap: SnapshotServiceClient<Channel>,
    /// What [`Clients::request`] puts in `image`.
    image: String,
}

/// Limits every cgroup version shows exactly: half a CPU, 64 MiB of memory, 50 pids.
pub const SMALL_LIMITS: pb::Resources = pb::Resources {
    cpu_millis: 500,
    memory_bytes: 64 << 20,
    pids_limit: 50,
};

impl TestEnv {
    /// Asserts that sandbox `id`'s cgroup holds [`SMALL_LIMITS`] as the kernel writes them.
    pub fn assert_small_limits(&self, id: &str) {
        let (memory, pids, quota) = self.cgroup.limits(id);
        assert_eq!(memory.as_deref(), Some("67108864"));
        assert_eq!(pids.as_deref(), Some("50"));
        assert_eq!(quota.as_deref(), Some("50000"));
    }

    /// Clients connected to this env's sandboxd; their sandboxes start from [`TestEnv::image_ref`].
    pub async fn clients(&self) -> Clients {
        Clients::new(self.channel().await, self.image_ref())
    }
}

impl Clients {
    /// Clients on `channel` whose [`Clients::request`] names `image`.
    pub fn new(channel: Channel, image: String) -> Clients {
        Clients {
            sb: SandboxServiceClient::new(channel.clone()),
            fs: FileServiceClient::new(channel.clone()),
            snap: SnapshotServiceClient::new(channel),
            image,
        }
    }

    /// A CreateSandboxRequest for sandbox `id` from the clients' image, all else default (the
    /// idle init, started).
    pub fn request(&self, id: &str) -> pb::CreateSandboxRequest {
        pb::CreateSandboxRequest {
            sandbox_id: id.into(),
            image: self.image.clone(),
            ..Default::default()
        }
    }

    /// CreateSandbox; returns the sandbox or the status.
    pub async fn try_create(
        &mut self,
        request: pb::CreateSandboxRequest,
    ) -> Result<pb::Sandbox, Status> {
        self.sb.create_sandbox(request).await.map(|r| {
            r.into_inner()
                .sandbox
                .expect("CreateSandboxResponse has a sandbox")
        })
    }

    /// CreateSandbox, asserting it succeeds; returns the sandbox.
    pub async fn create(&mut self, request: pb::CreateSandboxRequest) -> pb::Sandbox {
        let id = request.sandbox_id.clone();
        self.try_create(request)
            .await
            .unwrap_or_else(|e| panic!("create {id}: {e}"))
    }

    /// Creates sandbox `id` from the clients' image, running the idle init.
    pub async fn create_running(&mut self, id: &str) -> pb::Sandbox {
        self.create(self.request(id)).await
    }

    /// Creates sandbox `id` from snapshot `snapshot_id` (a fork), running the idle init.
    pub async fn create_from_snapshot(&mut self, id: &str, snapshot_id: &str) -> pb::Sandbox {
        self.create(pb::CreateSandboxRequest {
            sandbox_id: id.into(),
            snapshot_id: snapshot_id.into(),
            ..Default::default()
        })
        .await
    }

    /// GetSandbox; returns the sandbox or the status.
    pub async fn try_get(&mut self, id: &str) -> Result<pb::Sandbox, Status> {
        self.sb
            .get_sandbox(pb::GetSandboxRequest {
                sandbox_id: id.into(),
            })
            .await
            .map(|r| {
                r.into_inner()
                    .sandbox
                    .expect("GetSandboxResponse has a sandbox")
            })
    }

    /// GetSandbox, asserting it succeeds.
    pub async fn get(&mut self, id: &str) -> pb::Sandbox {
        self.try_get(id)
            .await
            .unwrap_or_else(|e| panic!("get {id}: {e}"))
    }

    /// StartSandbox, asserting it succeeds.
    pub async fn start(&mut self, id: &str) -> pb::Sandbox {
        self.sb
            .start_sandbox(pb::StartSandboxRequest {
                sandbox_id: id.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("start {id}: {e}"))
            .into_inner()
            .sandbox
            .expect("StartSandboxResponse has a sandbox")
    }

    /// StopSandbox as `request` asks; returns the sandbox or the status.
    pub async fn try_stop(
        &mut self,
        request: pb::StopSandboxRequest,
    ) -> Result<pb::Sandbox, Status> {
        self.sb.stop_sandbox(request).await.map(|r| {
            r.into_inner()
                .sandbox
                .expect("StopSandboxResponse has a sandbox")
        })
    }

    /// StopSandbox with `force` and the default timeout, asserting it succeeds.
    pub async fn force_stop(&mut self, id: &str) -> pb::Sandbox {
        self.try_stop(pb::StopSandboxRequest {
            sandbox_id: id.into(),
            force: true,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("stop {id}: {e}"))
    }

    /// DeleteSandbox; `Ok` or the status.
    pub async fn try_delete(&mut self, id: &str, force: bool) -> Result<(), Status> {
        self.sb
            .delete_sandbox(pb::DeleteSandboxRequest {
                sandbox_id: id.into(),
                force,
            })
            .await
            .map(|_| ())
    }

    /// DeleteSandbox with `force` (whatever state it is in), asserting it succeeds.
    pub async fn force_delete(&mut self, id: &str) {
        self.try_delete(id, true)
            .await
            .unwrap_or_else(|e| panic!("delete {id}: {e}"));
    }

    /// ExecSync of `sh -c script` in sandbox `id`, asserting the RPC succeeds (whatever the
    /// script's exit code).
    pub async fn exec_sh(&mut self, id: &str, script: &str) -> pb::ExecSyncResponse {
        self.sb
            .exec_sync(pb::ExecSyncRequest {
                sandbox_id: id.into(),
                args: vec!["sh".into(), "-c".into(), script.into()],
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("exec in {id}: {e}"))
            .into_inner()
    }

    /// `sh -c script` in sandbox `id`: its exit code and its stdout followed by its stderr.
    pub async fn sh(&mut self, id: &str, script: &str) -> (i32, String) {
        let r = self.exec_sh(id, script).await;
        (
            r.exit_code,
            String::from_utf8_lossy(&r.stdout).into_owned() + &String::from_utf8_lossy(&r.stderr),
        )
    }

    /// `sh -c script` in sandbox `id`, asserting it exits 0; returns its stdout.
    pub async fn sh_ok(&mut self, id: &str, script: &str) -> String {
        let r = self.exec_sh(id, script).await;
        assert_eq!(
            r.exit_code,
            0,
            "{script}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        String::from_utf8(r.stdout).unwrap()
    }

    /// CommitSnapshot of sandbox `id` without labels; returns the snapshot or the status.
    pub async fn try_commit(&mut self, id: &str) -> Result<pb::Snapshot, Status> {
        self.snap
            .commit_snapshot(pb::CommitSnapshotRequest {
                sandbox_id: id.into(),
                ..Default::default()
            })
            .await
            .map(|r| {
                r.into_inner()
                    .snapshot
                    .expect("CommitSnapshotResponse has a snapshot")
            })
    }

    /// CommitSnapshot of sandbox `id` without labels, asserting it succeeds.
    pub async fn commit(&mut self, id: &str) -> pb::Snapshot {
        self.try_commit(id)
            .await
            .unwrap_or_else(|e| panic!("commit {id}: {e}"))
    }

    /// GetSnapshot; returns the snapshot or the status.
    pub async fn try_get_snapshot(&mut self, snapshot_id: &str) -> Result<pb::Snapshot, Status> {
        self.snap
            .get_snapshot(pb::GetSnapshotRequest {
                snapshot_id: snapshot_id.into(),
            })
            .await
            .map(|r| {
                r.into_inner()
                    .snapshot
                    .expect("GetSnapshotResponse has a snapshot")
            })
    }

    /// RestoreSandbox of sandbox `id` onto `snapshot_id`; returns the sandbox or the status.
    pub async fn try_restore(
        &mut self,
        id: &str,
        snapshot_id: &str,
    ) -> Result<pb::Sandbox, Status> {
        self.snap
            .restore_sandbox(pb::RestoreSandboxRequest {
                sandbox_id: id.into(),
                snapshot_id: snapshot_id.into(),
                ..Default::default()
            })
            .await
            .map(|r| {
                r.into_inner()
                    .sandbox
                    .expect("RestoreSandboxResponse has a sandbox")
            })
    }

    /// ListSandboxes with no filter: every sandbox the API shows.
    pub async fn list(&mut self) -> Vec<pb::Sandbox> {
        self.sb
            .list_sandboxes(pb::ListSandboxesRequest::default())
            .await
            .unwrap_or_else(|e| panic!("list sandboxes: {e}"))
            .into_inner()
            .sandboxes
    }

    /// ListSnapshots with no filter: every snapshot the API shows.
    pub async fn list_snapshots(&mut self) -> Vec<pb::Snapshot> {
        self.snap
            .list_snapshots(pb::ListSnapshotsRequest::default())
            .await
            .unwrap_or_else(|e| panic!("list snapshots: {e}"))
            .into_inner()
            .snapshots
    }

    /// DeleteSnapshot; `Ok` or the status.
    pub async fn try_delete_snapshot(&mut self, snapshot_id: &str) -> Result<(), Status> {
        self.snap
            .delete_snapshot(pb::DeleteSnapshotRequest {
                snapshot_id: snapshot_id.into(),
            })
            .await
            .map(|_| ())
    }

    /// DeleteSnapshot, asserting it succeeds.
    pub async fn delete_snapshot(&mut self, snapshot_id: &str) {
        self.try_delete_snapshot(snapshot_id)
            .await
            .unwrap_or_else(|e| panic!("delete snapshot {snapshot_id}: {e}"));
    }
}
