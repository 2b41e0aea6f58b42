//! Access keys on a node: the table every client request is checked against, the key
//! admin requests (`quiver key ...`), and the bootstrap admin key of a new node.
//!
//! The rule itself (hashes, grants, what a request needs) is `quiver_core::access`; this
//! module keeps the node's current table in step with the replicated metadata and answers
//! the requests that change it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use quiver_core::access::{
    self, Access, AccessError, Grant, KeyEntry, KeyToken, Need, SALT_BYTES, SECRET_BYTES,
};
use quiver_core::meta::{MetaState, Stamp};
use quiver_sdk::wire::{ErrorCode, KeyInfo, Request, Response};

use super::{Cluster, error};

/// The live keys of the cluster as this node knows them, rebuilt on every metadata change.
pub(crate) type KeyTable = HashMap<String, KeyEntry>;

/// The key a client connection authenticated with: its name and the hash it verified
/// against, so a key deleted or re-created under the same name since no longer counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Key name.
    pub name: String,
    hash: [u8; 32],
}

/// What `request` needs from the connection's key. `None`: nothing (a ping, or the
/// authentication itself).
pub fn need(request: &Request) -> Option<Need> {
    let on = |bucket: &str, access: Access| {
        Some(Need::Bucket {
            bucket: bucket.to_string(),
            access,
        })
    };
    match request {
        Request::Ping | Request::Authenticate { .. } => None,
        Request::Status
        | Request::Ring
        | Request::PluginList
        | Request::PluginShow { .. }
        | Request::BucketShow { .. } => Some(Need::AnyKey),
        Request::Get { bucket, .. } => on(bucket, Access::Read),
        Request::Put { bucket, .. }
        | Request::Delete { bucket, .. }
        | Request::Update { bucket, .. } => on(bucket, Access::Write),
        Request::PluginUpload { .. }
        | Request::BucketSet { .. }
        | Request::ClusterJoin { .. }
        | Request::ClusterLeave { .. }
        | Request::ClusterPlan
        | Request::ClusterCommit
        | Request::KeyCreate { .. }
        | Request::KeyList
        | Request::KeyShow { .. }
        | Request::KeyDelete { .. }
        | Request::PluginDelete { .. } => Some(Need::Admin),
    }
}

/// The operation a request is, for refusal messages.
fn operation(request: &Request) -> &'static str {
    match request {
        Request::Ping => "ping",
        Request::Authenticate { .. } => "authenticate",
        Request::Status => "cluster status",
        Request::Ring => "cluster ring",
        Request::Get { .. } => "get",
        Request::Put { .. } => "put",
        Request::Delete { .. } => "delete",
        Request::Update { .. } => "update",
        Request::PluginUpload { .. } => "plugin upload",
        Request::PluginList => "plugin list",
        Request::PluginShow { .. } => "plugin show",
        Request::BucketSet { .. } => "bucket set",
        Request::BucketShow { .. } => "bucket show",
        Request::ClusterJoin { .. } => "cluster join",
        Request::ClusterLeave { .. } => "cluster leave",
        Request::ClusterPlan => "cluster plan",
        Request::ClusterCommit => "cluster commit",
        Request::KeyCreate { .. } => "key create",
        Request::KeyList => "key list",
        Request::KeyShow { .. } => "key show",
        Request::KeyDelete { .. } => "key delete",
        Request::PluginDelete { .. } => "plugin delete",
    }
}

fn info(name: &str, entry: &KeyEntry) -> KeyInfo {
    KeyInfo {
        name: name.to_string(),
        admin: entry.admin,
        grants: entry.grants.iter().map(Grant::to_string).collect(),
        created: entry.stamp.clone(),
    }
}

impl Cluster {
    /// Rebuilds the key table from the metadata.
    pub(crate) fn refresh_keys(&self, state: &MetaState) {
        let table: KeyTable = state
            .keys
            .iter()
            .filter(|(_, e)| !e.deleted)
            .map(|(n, e)| (n.clone(), e.clone()))
            .collect();
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(table);
    }

    fn key_table(&self) -> Arc<KeyTable> {
        Arc::clone(&self.keys.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn refused(&self, code: ErrorCode, message: String) -> Response {
        self.auth_refused.fetch_add(1, Ordering::Relaxed);
        error(code, message)
    }

    /// Counts a connection refused at the handshake by a connection limit.
    pub fn count_refused_connection(&self) {
        self.connections_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Client requests refused for want of a valid key or grant since start.
    pub(crate) fn auth_refused(&self) -> u64 {
        self.auth_refused.load(Ordering::Relaxed)
    }

    /// Checks a connection's key (name and secret). The refusal does not say whether the
    /// name exists, so names cannot be probed.
    pub fn authenticate(&self, name: &str, secret: &[u8]) -> Result<Principal, Response> {
        let table = self.key_table();
        match table.get(name) {
            Some(entry) if entry.verifies(secret) => Ok(Principal {
                name: name.to_string(),
                hash: entry.hash,
            }),
            _ => Err(self.refused(
                ErrorCode::Unauthenticated,
                format!(
                    "node {}: access key {name:?} is unknown, deleted or its secret is wrong",
                    self.me()
                ),
            )),
        }
    }

    /// Checks `request` against the connection's key before any work is done.
    pub fn authorize(&self, principal: Option<&Principal>, request: &Request) -> Option<Response> {
        let need = need(request)?;
        let op = operation(request);
        let Some(principal) = principal else {
            return Some(self.refused(
                ErrorCode::Unauthenticated,
                format!(
                    "node {}: {op} needs an access key (pass --key or set QUIVER_KEY; \
                     `quiver key create` makes one)",
                    self.me()
                ),
            ));
        };
        let table = self.key_table();
        let entry = match table.get(&principal.name) {
            Some(e) if e.hash == principal.hash => e,
            _ => {
                return Some(self.refused(
                    ErrorCode::Unauthenticated,
                    format!(
                        "node {}: access key {:?} was deleted or replaced",
                        self.me(),
                        principal.name
                    ),
                ));
            }
        };
        match entry.authorize(&need) {
            Ok(()) => None,
            Err(denied) => Some(self.refused(
                ErrorCode::Forbidden,
                format!(
                    "node {}: {op} refused for access key {:?}: {denied}",
                    self.me(),
                    principal.name
                ),
            )),
        }
    }

    /// Whether the connection authenticated as an admin key.
    pub fn is_admin(&self, principal: &Principal) -> bool {
        self.key_table()
            .get(&principal.name)
            .is_some_and(|e| e.hash == principal.hash && e.admin)
    }

    /// Stores `entry` under `name` and spreads it to every peer at once.
    async fn put_key(self: &Arc<Self>, name: &str, entry: KeyEntry) -> Result<(), Response> {
        let incoming = MetaState {
            keys: [(name.to_string(), entry)].into_iter().collect(),
            ..MetaState::default()
        };
        self.take_meta(&incoming, &[])
            .await
            .map_err(|e| error(ErrorCode::Storage, format!("key {name:?}: {e}")))?;
        let (_, pending) = self.push_meta(Vec::new()).await;
        if !pending.is_empty() {
            tracing::info!(
                key = name,
                ?pending,
                "key change spreads to these by gossip"
            );
        }
        Ok(())
    }

    /// `quiver key create`.
    pub(super) async fn key_create(
        self: &Arc<Self>,
        name: String,
        admin: bool,
        grants: Vec<String>,
    ) -> Response {
        let invalid = |m: String| error(ErrorCode::InvalidKey, m);
        if !access::valid_key_name(&name) {
            return invalid(AccessError::InvalidName(name).to_string());
        }
        if grants.len() > access::GRANTS_PER_KEY_MAX {
            return invalid(format!(
                "key {name:?}: {} grants, more than the limit of {}",
                grants.len(),
                access::GRANTS_PER_KEY_MAX
            ));
        }
        let grants: Vec<Grant> = match grants.iter().map(|g| g.parse()).collect() {
            Ok(g) => g,
            Err(e) => return invalid(format!("key {name:?}: {e}")),
        };
        let state = self.meta.state();
        if state.keys.get(&name).is_some_and(|e| !e.deleted) {
            return invalid(format!(
                "key {name:?} exists (delete it first, or pick another name)"
            ));
        }
        if state.keys.len() >= access::KEYS_MAX {
            return invalid(format!(
                "the cluster holds {} keys, the limit",
                access::KEYS_MAX
            ));
        }
        let secret: [u8; SECRET_BYTES] = rand::random();
        let salt: [u8; SALT_BYTES] = rand::random();
        let token = match KeyToken::new(&name, secret) {
            Ok(t) => t,
            Err(e) => return invalid(e.to_string()),
        };
        let entry = KeyEntry::new(&secret, salt, admin, grants, self.stamp());
        let key = info(&name, &entry);
        if let Err(reply) = self.put_key(&name, entry).await {
            return reply;
        }
        tracing::info!(key = %name, admin, "access key created");
        Response::KeyCreated {
            key,
            token: token.reveal(),
        }
    }

    /// `quiver key list` and `quiver key show NAME`.
    pub(super) fn key_list(&self, name: Option<&str>) -> Response {
        let state = self.meta.state();
        let keys: Vec<KeyInfo> = state
            .keys
            .iter()
            .filter(|(n, e)| !e.deleted && name.is_none_or(|want| want == n.as_str()))
            .map(|(n, e)| info(n, e))
            .collect();
        if let Some(name) = name
            && keys.is_empty()
        {
            return error(ErrorCode::InvalidKey, format!("no access key {name:?}"));
        }
        Response::Keys(keys)
    }

    /// `quiver key delete NAME`.
    pub(super) async fn key_delete(self: &Arc<Self>, name: String) -> Response {
        let state = self.meta.state();
        let Some(entry) = state.keys.get(&name).filter(|e| !e.deleted) else {
            return error(ErrorCode::InvalidKey, format!("no access key {name:?}"));
        };
        let gone = info(&name, entry);
        // Later than the entry it deletes even if this node's clock is behind its creator's.
        let now = self.stamp();
        let stamp = if now > entry.stamp {
            now
        } else {
            Stamp::at(entry.stamp.timestamp_ms.saturating_add(1), self.me())
        };
        if let Err(reply) = self.put_key(&name, KeyEntry::tombstone(stamp)).await {
            return reply;
        }
        tracing::info!(key = %name, "access key deleted");
        Response::Keys(vec![gone])
    }

    /// Whether the metadata holds an entry (live or deleted) named `name`.
    pub fn has_key_entry(&self, name: &str) -> bool {
        self.meta.state().keys.contains_key(name)
    }

    /// Adds a bootstrap admin key to the metadata at start, unless an entry of that name
    /// (live or deleted) is there already: a deleted bootstrap key stays deleted.
    pub async fn ensure_bootstrap_key(&self, token: &KeyToken, stamp: Stamp) -> Result<(), String> {
        if self.meta.state().keys.contains_key(token.name()) {
            return Ok(());
        }
        let salt = access::bootstrap_salt(token.name());
        let entry = KeyEntry::new(token.secret(), salt, true, Vec::new(), stamp);
        let incoming = MetaState {
            keys: [(token.name().to_string(), entry)].into_iter().collect(),
            ..MetaState::default()
        };
        self.take_meta(&incoming, &[]).await
    }
}

/// A fresh admin key named `name`.
pub fn generate_token(name: &str) -> Result<KeyToken, AccessError> {
    KeyToken::new(name, rand::random())
}

/// Writes `token` to `path` readable by its owner only (0600), refusing to overwrite.
pub fn write_key_file(path: &Path, token: &KeyToken) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(format!("{}\n", token.reveal()).as_bytes())?;
    file.sync_all()?;
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Reads a key file written by [`write_key_file`] (or by hand: `NAME.SECRET`).
pub fn read_key_file(path: &Path) -> Result<KeyToken, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read key file {}: {e}", path.display()))?;
    KeyToken::parse(&text).map_err(|e| format!("key file {}: {e}", path.display()))
}
