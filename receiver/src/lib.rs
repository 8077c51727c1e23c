//! The receiver's output side as a library: the sinks and the command line that names their
//! formats. The binary (main.rs) uses it, and the writer benchmarks drive the same sinks.

pub mod cli;
pub mod sink;
pub mod token;
pub mod viewer_token;
