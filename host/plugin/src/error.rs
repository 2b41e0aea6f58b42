//! Errors of loading and calling plugins.

use std::path::PathBuf;

/// Why loading or calling a plugin failed.
///
/// Every variant about a plugin names it as `name@shorthash`, so that logs and client errors
/// say which version of which plugin misbehaved. A failed call never changes the caller's
/// data: the node keeps the siblings it had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PluginError {
    /// The compile cache directory could not be created or used.
    #[error("plugin cache directory {path}: {source}")]
    CacheDir {
        /// The directory.
        path: PathBuf,
        /// What the filesystem said.
        source: std::io::Error,
    },
    /// The Wasm engine could not be set up (a bug or an unsupported platform).
    #[error("plugin engine: {0}")]
    Engine(String),
    /// The bytes are not a Wasm component (a core module, or not Wasm at all).
    #[error("plugin {plugin}: not a Wasm component ({detail})")]
    NotAComponent {
        /// `name@shorthash`.
        plugin: String,
        /// What the bytes look like instead.
        detail: String,
    },
    /// The component failed validation or compilation.
    #[error("plugin {plugin}: invalid component: {detail}")]
    Compile {
        /// `name@shorthash`.
        plugin: String,
        /// The validator's or compiler's message.
        detail: String,
    },
    /// The component imports something; a reconciler must import nothing.
    #[error("plugin {plugin}: a reconciler must import nothing, but it imports {}", imports.join(", "))]
    ForbiddenImports {
        /// `name@shorthash`.
        plugin: String,
        /// The names of its imports.
        imports: Vec<String>,
    },
    /// The component does not export the `reconciler` interface of this contract version
    /// with the expected types.
    #[error(
        "plugin {plugin}: does not implement world reconciler-plugin of quiver:plugin@0.1.0: {detail}"
    )]
    WrongWorld {
        /// `name@shorthash`.
        plugin: String,
        /// What did not match.
        detail: String,
    },
    /// A call ran out of fuel: the plugin loops or is too slow for its input.
    #[error(
        "plugin {plugin}: {call} ran out of fuel ({fuel} units): it loops or its input is too big"
    )]
    OutOfFuel {
        /// `name@shorthash`.
        plugin: String,
        /// `merge`, `update` or `examples`.
        call: &'static str,
        /// The fuel it was given.
        fuel: u64,
    },
    /// A call ran past the wall-clock backstop (fuel did not stop it in time).
    #[error("plugin {plugin}: {call} ran longer than the {ms} ms wall-clock limit")]
    WallClock {
        /// `name@shorthash`.
        plugin: String,
        /// `merge`, `update` or `examples`.
        call: &'static str,
        /// The limit.
        ms: u64,
    },
    /// A call tried to grow its memory past the limit.
    #[error("plugin {plugin}: {call} exceeded its memory limit of {memory_bytes} bytes")]
    MemoryLimit {
        /// `name@shorthash`.
        plugin: String,
        /// `merge`, `update` or `examples`.
        call: &'static str,
        /// The limit.
        memory_bytes: usize,
    },
    /// A call trapped (a panic, an unreachable, an out-of-bounds access, or output the
    /// component boundary could not read).
    #[error("plugin {plugin}: {call} trapped: {detail}")]
    Trap {
        /// `name@shorthash`.
        plugin: String,
        /// `merge`, `update` or `examples`.
        call: &'static str,
        /// The trap and its context.
        detail: String,
    },
    /// A call returned more bytes than allowed.
    #[error("plugin {plugin}: {call} returned {bytes} bytes, over the limit of {limit}")]
    OutputTooLarge {
        /// `name@shorthash`.
        plugin: String,
        /// `merge`, `update` or `examples`.
        call: &'static str,
        /// What it returned.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// The plugin refused a value (`plugin-error::invalid-value`).
    #[error("plugin {plugin}: {call} refused a value: {message}")]
    InvalidValue {
        /// `name@shorthash`.
        plugin: String,
        /// `merge` or `update`.
        call: &'static str,
        /// The plugin's explanation.
        message: String,
    },
    /// The plugin refused an operation (`plugin-error::invalid-op`).
    #[error("plugin {plugin}: {call} refused the operation: {message}")]
    InvalidOp {
        /// `name@shorthash`.
        plugin: String,
        /// Always `update`.
        call: &'static str,
        /// The plugin's explanation.
        message: String,
    },
    /// The plugin does not implement this call (`plugin-error::unsupported`).
    #[error("plugin {plugin}: {call} is not supported: {message}")]
    Unsupported {
        /// `name@shorthash`.
        plugin: String,
        /// The call.
        call: &'static str,
        /// The plugin's explanation.
        message: String,
    },
    /// `merge` was called without siblings (the contract promises at least one).
    #[error("plugin {plugin}: merge needs at least one sibling")]
    NoSiblings {
        /// `name@shorthash`.
        plugin: String,
    },
}
