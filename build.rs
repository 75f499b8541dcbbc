//! Compiles sandboxd's public protos and writes the descriptor set served by reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos: Vec<PathBuf> = std::fs::read_dir("proto/sandboxd/v1")?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter(|p| p.extension().is_some_and(|ext| ext == "proto"))
        .collect();
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("sandboxd_descriptor.bin"))
        // Exec output as `Bytes`: the chunk read from the process goes out without a copy.
        .bytes(".sandboxd.v1.ExecResponse")
        .compile_protos(&protos, &[PathBuf::from("proto")])?;
    Ok(())
}
