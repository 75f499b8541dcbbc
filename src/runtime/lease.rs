//! containerd leases: what a multi-step operation creates stays alive until the operation ends.

use std::time::{Duration, SystemTime};

use containerd_client::services::v1::{CreateRequest, DeleteRequest};

use super::Containerd;
use crate::error::{Error, Result};

/// A lease that outlives a crash by at most this long, after which containerd's GC drops it.
const LEASE_EXPIRY: Duration = Duration::from_secs(3600);

/// A held lease; call [`Lease::release`] when done (a crash leaves it to expire).
#[derive(Debug)]
pub struct Lease {
    id: String,
}

impl Lease {
    /// Creates a lease named after `purpose`.
    pub async fn acquire(cd: &Containerd, purpose: &str) -> Result<Lease> {
        let id = format!("sandboxd-{purpose}-{}", crate::util::random_hex(8));
        let expire = prost_types::Timestamp::from(SystemTime::now() + LEASE_EXPIRY);
        let req = CreateRequest {
            id: id.clone(),
            labels: [("containerd.io/gc.expire".to_string(), expire.to_string())].into(),
        };
        cd.leases()
            .create(cd.req(req))
            .await
            .map_err(|s| Error::containerd("leases.create", s))?;
        Ok(Lease { id })
    }

    /// The lease id, for the `containerd-lease` header.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Deletes the lease; what it protected is now only kept if something else references it.
    pub async fn release(self, cd: &Containerd) -> Result<()> {
        let req = DeleteRequest {
            id: self.id.clone(),
            sync: false,
        };
        match cd.leases().delete(cd.req(req)).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
            Err(s) => Err(Error::containerd("leases.delete", s)),
        }
    }
}
