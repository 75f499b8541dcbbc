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
