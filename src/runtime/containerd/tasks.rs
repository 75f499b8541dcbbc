//! [`Tasks`] on containerd's Tasks and Events services.

use std::collections::HashMap;

use containerd_client::services::v1::{
    CloseIoRequest, CreateTaskRequest, DeleteProcessRequest, DeleteTaskRequest, ExecProcessRequest,
    GetRequest, KillRequest, ListTasksRequest, PauseTaskRequest, ResizePtyRequest,
    ResumeTaskRequest, StartRequest, SubscribeRequest, UpdateTaskRequest, WaitRequest,
};
use containerd_client::types::v1::{Process, Status};
use futures::StreamExt;
use prost::Message;

use super::{call, cd_error, mounts_to, ok_if_missing, time_from, Containerd};
use crate::error::Result;
use crate::runtime::backend::{ExitStream, NewExec, Tasks};
use crate::runtime::spec::RESOURCES_TYPE_URL;
use crate::runtime::types::{Exit, Mount, Task, TaskExit, TaskState};

/// Type URL of an exec process spec.
const PROCESS_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Process";

/// containerd's task status, converted once.
fn state_from(status: i32) -> TaskState {
    match Status::try_from(status).unwrap_or(Status::Unknown) {
        Status::Created => TaskState::Created,
        Status::Running => TaskState::Running,
        Status::Paused | Status::Pausing => TaskState::Paused,
        Status::Stopped => TaskState::Stopped,
        Status::Unknown => TaskState::Unknown,
    }
}

fn task_from(p: &Process) -> Task {
    Task {
        pid: p.pid,
        state: state_from(p.status),
        exit_status: p.exit_status,
        exited_at: time_from(p.exited_at),
    }
}

/// Success, or a failure that says the process is gone or not in a state the call applies to
/// (NOT_FOUND, FAILED_PRECONDITION): then there was nothing to do.
fn ok_if_not_live<T>(
    op: &'static str,
    result: std::result::Result<tonic::Response<T>, tonic::Status>,
) -> Result<()> {
    match result {
        Ok(_) => Ok(()),
        Err(s)
            if matches!(
                s.code(),
                tonic::Code::NotFound | tonic::Code::FailedPrecondition
            ) =>
        {
            Ok(())
        }
        Err(s) => Err(cd_error(op, s)),
    }
}

/// containerd names PID 1 by an empty exec id.
fn exec_id_of(exec_id: Option<&str>) -> String {
    exec_id.unwrap_or_default().to_string()
}

#[async_trait::async_trait]
impl Tasks for Containerd {
    async fn task(&self, id: &str) -> Result<Option<Task>> {
        let req = GetRequest {
            container_id: id.to_string(),
            exec_id: String::new(),
        };
        let resp = self.tasks().get(self.task_req(req)).await;
        Ok(
            ok_if_missing("tasks.get", resp.map(|r| r.into_inner().process), None)?
                .as_ref()
                .map(task_from),
        )
    }

    async fn tasks(&self) -> Result<HashMap<String, Task>> {
        let req = ListTasksRequest {
            filter: String::new(),
        };
        let resp = call("tasks.list", self.tasks().list(self.task_req(req)).await)?;
        Ok(resp
            .tasks
            .iter()
            .map(|t| {
                // containerd's ListTasks fills in the task id, not container_id (they are equal).
                let id = if t.container_id.is_empty() {
                    t.id.clone()
                } else {
                    t.container_id.clone()
                };
                (id, task_from(t))
            })
            .collect())
    }

    async fn create_task(&self, id: &str, rootfs: &[Mount]) -> Result<()> {
        let req = CreateTaskRequest {
            container_id: id.to_string(),
            rootfs: mounts_to(rootfs),
            ..Default::default()
        };
        call(
            "tasks.create",
            self.tasks().create(self.task_req(req)).await,
        )
        .map(|_| ())
    }

    async fn start(&self, id: &str, exec_id: Option<&str>) -> Result<u32> {
        let req = StartRequest {
            container_id: id.to_string(),
            exec_id: exec_id_of(exec_id),
        };
        Ok(call("tasks.start", self.tasks().start(self.task_req(req)).await)?.pid)
    }

    async fn kill(&self, id: &str, exec_id: Option<&str>, signal: u32, all: bool) -> Result<()> {
        let req = KillRequest {
            container_id: id.to_string(),
            exec_id: exec_id_of(exec_id),
            signal,
            all,
        };
        // Already gone (or exited, not yet deleted): nothing to signal.
        ok_if_not_live("tasks.kill", self.tasks().kill(self.task_req(req)).await)
    }

    async fn pause(&self, id: &str) -> Result<()> {
        let req = PauseTaskRequest {
            container_id: id.to_string(),
        };
        call("tasks.pause", self.tasks().pause(self.task_req(req)).await).map(|_| ())
    }

    async fn resume(&self, id: &str) -> Result<()> {
        let req = ResumeTaskRequest {
            container_id: id.to_string(),
        };
        // Gone, or not paused: nothing to thaw.
        ok_if_not_live(
            "tasks.resume",
            self.tasks().resume(self.task_req(req)).await,
        )
    }

    async fn wait(&self, id: &str, exec_id: Option<&str>) -> Result<Option<Exit>> {
        let req = WaitRequest {
            container_id: id.to_string(),
            exec_id: exec_id_of(exec_id),
        };
        // As long as the process runs.
        let resp = self.tasks().wait(self.req_for(req, None)).await;
        Ok(
            ok_if_missing("tasks.wait", resp.map(|r| Some(r.into_inner())), None)?.map(|w| Exit {
                status: w.exit_status,
                at: time_from(w.exited_at),
            }),
        )
    }

    async fn delete_task(&self, id: &str) -> Result<Option<Exit>> {
        let req = DeleteTaskRequest {
            container_id: id.to_string(),
        };
        let resp = self.tasks().delete(self.task_req(req)).await;
        Ok(
            ok_if_missing("tasks.delete", resp.map(|r| Some(r.into_inner())), None)?.map(|d| {
                Exit {
                    status: d.exit_status,
                    at: time_from(d.exited_at),
                }
            }),
        )
    }

    async fn update_resources(&self, id: &str, resources: Vec<u8>) -> Result<()> {
        let req = UpdateTaskRequest {
            container_id: id.to_string(),
            resources: Some(prost_types::Any {
                type_url: RESOURCES_TYPE_URL.into(),
                value: resources,
            }),
            annotations: HashMap::new(),
        };
        call(
            "tasks.update",
            self.tasks().update(self.task_req(req)).await,
        )
        .map(|_| ())
    }

    async fn exec(&self, id: &str, exec: NewExec<'_>) -> Result<()> {
        let req = ExecProcessRequest {
            container_id: id.to_string(),
            stdin: exec.io.stdin,
            stdout: exec.io.stdout,
            stderr: exec.io.stderr,
            terminal: exec.io.terminal,
            spec: Some(prost_types::Any {
                type_url: PROCESS_TYPE_URL.into(),
                value: exec.process.to_vec(),
            }),
            exec_id: exec.exec_id.to_string(),
        };
        call("tasks.exec", self.tasks().exec(self.task_req(req)).await).map(|_| ())
    }

    async fn delete_process(&self, id: &str, exec_id: &str) -> Result<()> {
        let req = DeleteProcessRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
        };
        let resp = self.tasks().delete_process(self.task_req(req)).await;
        ok_if_missing("tasks.delete_process", resp.map(|_| ()), ())
    }

    async fn resize_pty(&self, id: &str, exec_id: &str, rows: u32, cols: u32) -> Result<()> {
        let req = ResizePtyRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            width: cols,
            height: rows,
        };
        call(
            "tasks.resize_pty",
            self.tasks().resize_pty(self.task_req(req)).await,
        )
        .map(|_| ())
    }

    async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        let req = CloseIoRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            stdin: true,
        };
        call(
            "tasks.close_io",
            self.tasks().close_io(self.task_req(req)).await,
        )
        .map(|_| ())
    }

    async fn exits(&self) -> Result<ExitStream> {
        let filter = format!("namespace==\"{}\",topic==\"/tasks/exit\"", self.namespace);
        let req = SubscribeRequest {
            filters: vec![filter],
        };
        let stream = call(
            "events.subscribe",
            self.events().subscribe(self.req_for(req, None)).await,
        )?;
        Ok(Box::pin(stream.filter_map(|envelope| async move {
            match envelope {
                Err(s) => Some(Err(cd_error("events.subscribe", s))),
                Ok(envelope) => {
                    let exit = envelope.event.and_then(|any| {
                        containerd_client::events::TaskExit::decode(any.value.as_slice()).ok()
                    })?;
                    Some(Ok(TaskExit {
                        container_id: exit.container_id,
                        process_id: exit.id,
                        status: exit.exit_status,
                    }))
                }
            }
        })))
    }
}
