//! Generates the chat.v1 messages and tonic's service trait from the project's own proto.

fn main() {
    let proto = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../proto");
    println!("cargo:rerun-if-changed={proto}/chat/v1/chat.proto");
    let fds = protox::compile(["chat/v1/chat.proto"], [proto]).expect("parsing chat.proto");
    let mut config = prost_build::Config::new();
    config.service_generator(tonic_build::configure().build_client(false).service_generator());
    config.compile_fds(fds).expect("generating the chat.v1 code");
}
