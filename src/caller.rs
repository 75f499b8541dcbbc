//! Who makes a call: the tenant that limits are counted by.
//!
//! A caller is decided in one place, [`Caller::identify`], which the server runs on every
//! request and whose answer travels in the request's extensions. sandboxd does not
//! authenticate callers yet, so every call is the [`Tenant::DEFAULT`] tenant's; when callers
//! present credentials, only `identify` changes.

use std::fmt;

/// A tenant: whose calls share one set of limits.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tenant(String);

impl Tenant {
    /// The name of the tenant of every caller that does not authenticate (today: all).
    pub const DEFAULT: &'static str = "default";

    /// The tenant's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tenant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The caller of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    tenant: Tenant,
}

impl Caller {
    /// A caller that did not authenticate: the default tenant's.
    pub fn anonymous() -> Caller {
        Caller {
            tenant: Tenant(Tenant::DEFAULT.to_string()),
        }
    }

    /// Decides who sent `req`. No caller authenticates yet: every one is anonymous.
    pub fn identify<B>(_req: &http::Request<B>) -> Caller {
        Caller::anonymous()
    }

    /// The caller the server recorded in a request's `extensions`; anonymous when none was
    /// (a request that did not come through the server, as in tests).
    pub fn of(extensions: &http::Extensions) -> Caller {
        extensions
            .get::<Caller>()
            .cloned()
            .unwrap_or_else(Caller::anonymous)
    }

    /// The caller's tenant.
    pub fn tenant(&self) -> &Tenant {
        &self.tenant
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_caller_is_the_default_tenant_until_callers_authenticate() {
        let req = http::Request::get("/sandboxd.v1.FileService/ReadFile")
            .body(())
            .unwrap();
        let caller = Caller::identify(&req);
        assert_eq!(caller.tenant().as_str(), "default");
        let mut ext = http::Extensions::new();
        assert_eq!(Caller::of(&ext), caller);
        ext.insert(caller.clone());
        assert_eq!(Caller::of(&ext), caller);
    }
}
