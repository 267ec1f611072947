//! The thread-per-stream grpcio server (being written).
