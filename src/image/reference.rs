//! Image references: parsed once at the edge, normalised the way Docker and containerd do.

use std::fmt;

use oci_spec::distribution::Reference;

use crate::error::{Error, Result};

/// A valid, normalised image reference (`docker.io/library/busybox:latest`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef(Reference);

impl ImageRef {
    /// Parses `input`, naming `field` in the error. Short forms gain `docker.io/library/` and
    /// `:latest`.
    pub fn parse(field: &str, input: &str) -> Result<ImageRef> {
        if input.is_empty() {
            return Err(Error::invalid(field, "an image reference is required"));
        }
        if input.len() > 512 || input.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(Error::invalid(
                field,
                format!("{input:?} is not a valid image reference"),
            ));
        }
        let reference = Reference::try_from(input).map_err(|e| {
            Error::invalid(
                field,
                format!("{input:?} is not a valid image reference: {e}"),
            )
        })?;
        // Like Docker and containerd: repository paths are lowercase.
        if reference
            .repository()
            .chars()
            .any(|c| c.is_ascii_uppercase())
        {
            return Err(Error::invalid(
                field,
                format!(
                    "{input:?} is not a valid image reference: the repository must be lowercase"
                ),
            ));
        }
        Ok(ImageRef(reference))
    }

    /// The normalised name under which the image is stored.
    pub fn name(&self) -> String {
        self.0.whole()
    }

    /// The parsed reference, for the registry client.
    pub fn reference(&self) -> &Reference {
        &self.0
    }

    /// True when the registry is on this host's loopback, which speaks plain HTTP.
    pub fn is_local_registry(&self) -> bool {
        let registry = self.0.registry();
        let host = match registry.strip_prefix('[') {
            Some(rest) => rest.split(']').next().unwrap_or(""),
            None => registry.split(':').next().unwrap_or(""),
        };
        host == "localhost"
            || host == "::1"
            || host
                .parse::<std::net::Ipv4Addr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_normalise_to_docker_hub() {
        assert_eq!(
            ImageRef::parse("image", "busybox").unwrap().name(),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(
            ImageRef::parse("image", "busybox:1.36").unwrap().name(),
            "docker.io/library/busybox:1.36"
        );
        assert_eq!(
            ImageRef::parse("image", "127.0.0.1:5000/team/app:v1")
                .unwrap()
                .name(),
            "127.0.0.1:5000/team/app:v1"
        );
    }

    #[test]
    fn loopback_registries_are_local() {
        for r in ["localhost:5000/a", "127.0.0.1:5000/a", "127.1.2.3/a:b"] {
            assert!(
                ImageRef::parse("image", r).unwrap().is_local_registry(),
                "{r}"
            );
        }
        for r in ["busybox", "10.0.0.1:5000/a", "registry.example.com/a"] {
            assert!(
                !ImageRef::parse("image", r).unwrap().is_local_registry(),
                "{r}"
            );
        }
    }

    #[test]
    fn malformed_references_name_the_field() {
        for bad in ["", "UPPER/case", "a b", "busybox:", "::"] {
            let err = ImageRef::parse("image", bad).unwrap_err();
            assert!(
                err.to_string().starts_with("invalid image:"),
                "{bad}: {err}"
            );
        }
    }
}
