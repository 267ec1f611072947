//! Generates the prost messages and grpcio stubs for `proto/chat/v1/chat.proto`.
//!
//! No `protoc` binary is needed: the proto file is parsed by the pure-Rust parser of
//! `protobuf-parse`, its descriptor set is re-read as `prost_types`, and `prost-build`
//! generates code from it with grpcio's service generator.

use std::error::Error;
use std::path::Path;

use prost::Message as _;
use protobuf::Message as _;

const PROTO: &str = "proto/chat/v1/chat.proto";

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed={PROTO}");
    println!("cargo:rerun-if-changed=build.rs");

    let parsed = protobuf_parse::Parser::new()
        .pure()
        .include("proto")
        .input(PROTO)
        .file_descriptor_set()
        .map_err(|e| format!("cannot parse {PROTO}: {e:#}"))?;
    let bytes = parsed.write_to_bytes()?;
    let fds = prost_types::FileDescriptorSet::decode(bytes.as_slice())?;

    let out_dir = std::env::var("OUT_DIR")?;
    prost_build::Config::new()
        .out_dir(Path::new(&out_dir))
        .service_generator(Box::new(grpcio_compiler::prost_codegen::Generator))
        .compile_fds(fds)?;
    Ok(())
}
