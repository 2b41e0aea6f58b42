//! The guest's stderr, forwarded line by line to the node's `tracing` log (target
//! `quiver_wasm_storage::guest`), so what an adapter says about recovery (a truncated tail,
//! say) reaches the operator. Its stdout is discarded: an adapter has nothing to print.

use std::sync::Arc;

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

/// Longest line kept; the rest of a longer line is dropped, so a guest printing without
/// newlines cannot grow host memory.
const LINE_BYTES_MAX: usize = 4096;
/// How much the guest may write per `check-write`.
const WRITE_PERMIT_BYTES: usize = 64 * 1024;

/// A stderr factory for one adapter instance.
#[derive(Clone)]
pub(crate) struct TracingStderr {
    engine: Arc<str>,
}

impl TracingStderr {
    pub(crate) fn new(engine: &str) -> Self {
        Self {
            engine: Arc::from(engine),
        }
    }
}

impl IsTerminal for TracingStderr {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for TracingStderr {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        // Only the WASIp3 bindings ask for this, and they are not linked.
        Box::new(tokio::io::sink())
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(LineStream {
            engine: Arc::clone(&self.engine),
            line: Vec::new(),
        })
    }
}

struct LineStream {
    engine: Arc<str>,
    line: Vec<u8>,
}

impl LineStream {
    fn emit(&mut self) {
        if !self.line.is_empty() {
            let text = String::from_utf8_lossy(&self.line);
            tracing::warn!(target: "quiver_wasm_storage::guest", engine = %self.engine, "{text}");
            self.line.clear();
        }
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for LineStream {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        for &b in bytes.iter() {
            if b == b'\n' {
                self.emit();
            } else if self.line.len() < LINE_BYTES_MAX {
                self.line.push(b);
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(WRITE_PERMIT_BYTES)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LineStream {
    async fn ready(&mut self) {}
}

impl Drop for LineStream {
    fn drop(&mut self) {
        // A last line without a newline is still worth showing.
        self.emit();
    }
}
