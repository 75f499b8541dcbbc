//! Namespaces: one per tenant, each a handle on the same connection.

use std::collections::HashMap;
use std::sync::Arc;

use containerd_client::services::v1::{
    CreateNamespaceRequest, GetNamespaceRequest, ListNamespacesRequest, Namespace,
    UpdateNamespaceRequest,
};

use super::{call, cd_error, Containerd};
use crate::error::Result;
use crate::runtime::backend::{Backend, Namespaces};

#[async_trait::async_trait]
impl Namespaces for Containerd {
    fn namespace(&self) -> &str {
        &self.namespace
    }

    fn in_namespace(&self, name: &str) -> Arc<dyn Backend> {
        Arc::new(self.with_namespace(name))
    }

    async fn ensure_namespace(&self, name: &str, labels: &HashMap<String, String>) -> Result<()> {
        let namespace = Namespace {
            name: name.to_string(),
            labels: labels.clone(),
        };
        let get = self
            .namespaces()
            .get(self.req(GetNamespaceRequest {
                name: name.to_string(),
            }))
            .await;
        let current = match get {
            Ok(r) => r.into_inner().namespace,
            Err(s) if s.code() == tonic::Code::NotFound => None,
            Err(s) => return Err(cd_error("namespaces.get", s)),
        };
        match current {
            None => {
                let created = self
                    .namespaces()
                    .create(self.req(CreateNamespaceRequest {
                        namespace: Some(namespace.clone()),
                    }))
                    .await;
                match created {
                    Ok(_) => return Ok(()),
                    // Made by a concurrent caller: set the labels below.
                    Err(s) if s.code() == tonic::Code::AlreadyExists => {}
                    Err(s) => return Err(cd_error("namespaces.create", s)),
                }
            }
            Some(ns) if labels.iter().all(|(k, v)| ns.labels.get(k) == Some(v)) => return Ok(()),
            Some(_) => {}
        }
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        call(
            "namespaces.update",
            self.namespaces()
                .update(self.req(UpdateNamespaceRequest {
                    namespace: Some(namespace),
                    update_mask: Some(prost_types::FieldMask { paths }),
                }))
                .await,
        )?;
        Ok(())
    }

    async fn namespaces_labelled(
        &self,
        key: &str,
        value: &str,
    ) -> Result<Vec<(String, HashMap<String, String>)>> {
        let listed = call(
            "namespaces.list",
            self.namespaces()
                .list(self.req(ListNamespacesRequest::default()))
                .await,
        )?;
        Ok(listed
            .namespaces
            .into_iter()
            .filter(|ns| ns.labels.get(key).is_some_and(|v| v == value))
            .map(|ns| (ns.name, ns.labels))
            .collect())
    }
}
