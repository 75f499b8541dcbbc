//! Generated code for the public `sandboxd.v1` API. Nothing outside `api/`, the client-facing
//! binaries and tests should need these types.
#![allow(missing_docs, clippy::all, clippy::pedantic)]

tonic::include_proto!("sandboxd.v1");

/// Encoded `FileDescriptorSet` of `sandboxd.v1`, served by the reflection service.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("sandboxd_descriptor");
