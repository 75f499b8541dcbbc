//! [`Containers`] on containerd's Containers service.

use std::collections::HashMap;

use containerd_client::services::v1::container::Runtime;
use containerd_client::services::v1::{
    Container as CdContainer, CreateContainerRequest, DeleteContainerRequest, GetContainerRequest,
    ListContainersRequest, UpdateContainerRequest,
};

use super::{call, cd_error, ok_if_missing, time_from, Containerd, SNAPSHOTTER};
use crate::error::{Error, Kind, Result};
use crate::runtime::backend::{Containers, NewContainer};
use crate::runtime::spec::{runc_options, SPEC_TYPE_URL};
use crate::runtime::types::{Container, ContainerUpdate, Lease};

/// The runtime shim every sandbox uses.
const RUNTIME: &str = "io.containerd.runc.v2";

fn container_from(c: CdContainer) -> Container {
    Container {
        id: c.id,
        labels: c.labels,
        extensions: c
            .extensions
            .into_iter()
            .map(|(k, any)| (k, any.value))
            .collect(),
        image: c.image,
        spec: c.spec.map(|any| any.value).unwrap_or_default(),
        snapshot_key: c.snapshot_key,
        created_at: time_from(c.created_at),
    }
}

/// Type URL of the extensions sandboxd writes (JSON documents of its own).
fn extension_type_url(name: &str) -> String {
    format!("{name}+json")
}

#[async_trait::async_trait]
impl Containers for Containerd {
    async fn container(&self, id: &str) -> Result<Option<Container>> {
        let req = GetContainerRequest { id: id.to_string() };
        let resp = self.containers().get(self.req(req)).await;
        Ok(ok_if_missing(
            "containers.get",
            resp.map(|r| r.into_inner().container),
            None,
        )?
        .map(container_from))
    }

    async fn containers_labelled(&self, key: &str, value: &str) -> Result<Vec<Container>> {
        let req = ListContainersRequest {
            filters: vec![format!("labels.\"{key}\"=={value}")],
        };
        let resp = call(
            "containers.list",
            self.containers().list(self.req(req)).await,
        )?;
        Ok(resp.containers.into_iter().map(container_from).collect())
    }

    async fn create_container(&self, new: NewContainer, lease: &Lease) -> Result<()> {
        let c = new.container;
        let id = c.id.clone();
        let container = CdContainer {
            id: c.id,
            labels: c.labels,
            extensions: c
                .extensions
                .into_iter()
                .map(|(k, value)| {
                    let type_url = extension_type_url(&k);
                    (k, prost_types::Any { type_url, value })
                })
                .collect(),
            image: c.image,
            runtime: Some(Runtime {
                name: RUNTIME.into(),
                options: Some(runc_options(&new.runc_root)),
            }),
            spec: Some(prost_types::Any {
                type_url: SPEC_TYPE_URL.into(),
                value: c.spec,
            }),
            snapshotter: SNAPSHOTTER.into(),
            snapshot_key: c.snapshot_key,
            ..Default::default()
        };
        let req = CreateContainerRequest {
            container: Some(container),
        };
        match self
            .containers()
            .create(self.req_leased(req, lease.id()))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::AlreadyExists => Err(Error::AlreadyExists {
                kind: Kind::Sandbox,
                id,
            }),
            Err(s) => Err(cd_error("containers.create", s)),
        }
    }

    async fn update_container(&self, id: &str, update: ContainerUpdate) -> Result<()> {
        let mut paths: Vec<String> = update
            .labels
            .iter()
            .map(|(k, _)| format!("labels.{k}"))
            .collect();
        let labels: HashMap<String, String> = update
            .labels
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect();
        if update.spec.is_some() {
            paths.push("spec".into());
        }
        if update.snapshot_key.is_some() {
            paths.push("snapshotkey".into());
        }
        paths.extend(
            update
                .extensions
                .iter()
                .map(|(k, _)| format!("extensions.{k}")),
        );
        let extensions = update
            .extensions
            .into_iter()
            .map(|(k, value)| {
                let type_url = extension_type_url(&k);
                (k, prost_types::Any { type_url, value })
            })
            .collect();
        let req = UpdateContainerRequest {
            container: Some(CdContainer {
                id: id.to_string(),
                labels,
                spec: update.spec.map(|value| prost_types::Any {
                    type_url: SPEC_TYPE_URL.into(),
                    value,
                }),
                snapshot_key: update.snapshot_key.unwrap_or_default(),
                extensions,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask { paths }),
        };
        match self.containers().update(self.req(req)).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::NotFound => Err(Error::not_found(Kind::Sandbox, id)),
            Err(s) => Err(cd_error("containers.update", s)),
        }
    }

    async fn delete_container(&self, id: &str) -> Result<()> {
        let req = DeleteContainerRequest { id: id.to_string() };
        let resp = self.containers().delete(self.req(req)).await;
        ok_if_missing("containers.delete", resp.map(|_| ()), ())
    }
}
