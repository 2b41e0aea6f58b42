//! Access keys: who may do what (DESIGN.md, "Security").
//!
//! A client proves itself with an access key: a name and a 256-bit random secret, written
//! together as one token `NAME.SECRET` (secret in hex). The cluster keeps, per key name, a
//! [`KeyEntry`] in the replicated metadata: a random salt, `SHA-256(domain | salt | secret)`
//! (never the secret), whether the key is an admin key, and its bucket grants. Secrets are
//! random and long, so a fast salted hash is enough: there is nothing to brute-force that a
//! slow KDF would protect (passwords chosen by people would need one; keys are never chosen
//! by people).
//!
//! Entries merge like every other metadata entry: per name the later [`Stamp`] wins, and a
//! deletion is an entry too (`deleted`), so a node that has not heard of the deletion cannot
//! bring the key back by gossip.
//!
//! Everything here is pure: secrets and salts are drawn by the caller.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::stamp::Stamp;

/// Bytes of an access key's secret.
pub const SECRET_BYTES: usize = 32;
/// Bytes of a key entry's salt.
pub const SALT_BYTES: usize = 16;
/// Longest key name, in characters.
pub const KEY_NAME_CHARS_MAX: usize = 64;
/// Most grants one key may carry.
pub const GRANTS_PER_KEY_MAX: usize = 64;
/// Most access keys a cluster holds (deleted ones included until they are forgotten).
pub const KEYS_MAX: usize = 10_000;

/// Domain separation for the stored hash, so it can never be confused with another
/// SHA-256 the system computes.
const HASH_DOMAIN: &[u8] = b"quiver access key v1\0";

/// What a grant allows on its buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Access {
    /// get.
    Read,
    /// put, delete, update.
    Write,
    /// Both.
    ReadWrite,
}

impl Access {
    fn allows(self, wanted: Access) -> bool {
        self == Access::ReadWrite || self == wanted
    }

    fn name(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
            Access::ReadWrite => "readwrite",
        }
    }
}

/// Which buckets a grant covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BucketPattern {
    /// Exactly this bucket.
    Exact(String),
    /// Every bucket whose name starts with this (empty: every bucket).
    Prefix(String),
}

impl BucketPattern {
    fn matches(&self, bucket: &str) -> bool {
        match self {
            BucketPattern::Exact(b) => b == bucket,
            BucketPattern::Prefix(p) => bucket.starts_with(p.as_str()),
        }
    }
}

/// A bucket grant: `BUCKET:ACCESS` or `PREFIX*:ACCESS`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Grant {
    /// The buckets.
    pub buckets: BucketPattern,
    /// What is allowed on them.
    pub access: Access,
}

impl std::fmt::Display for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.buckets {
            BucketPattern::Exact(b) => write!(f, "{b}:{}", self.access.name()),
            BucketPattern::Prefix(p) => write!(f, "{p}*:{}", self.access.name()),
        }
    }
}

impl std::str::FromStr for Grant {
    type Err = AccessError;

    /// Parses `BUCKET:read|write|readwrite` or `PREFIX*:...` (`*:...` covers every bucket).
    fn from_str(s: &str) -> Result<Grant, AccessError> {
        let bad = |why: &str| AccessError::InvalidGrant {
            grant: s.to_string(),
            why: why.to_string(),
        };
        let (pattern, access) = s
            .rsplit_once(':')
            .ok_or_else(|| bad("expected BUCKET:ACCESS, e.g. carts:readwrite or logs-*:read"))?;
        let access = match access {
            "read" => Access::Read,
            "write" => Access::Write,
            "readwrite" | "rw" => Access::ReadWrite,
            _ => return Err(bad("access must be read, write or readwrite")),
        };
        let buckets = match pattern.strip_suffix('*') {
            Some(prefix) => BucketPattern::Prefix(prefix.to_string()),
            None if pattern.is_empty() => return Err(bad("the bucket is empty")),
            None => BucketPattern::Exact(pattern.to_string()),
        };
        let name = match &buckets {
            BucketPattern::Exact(b) | BucketPattern::Prefix(b) => b,
        };
        if name.contains('*') {
            return Err(bad("`*` may only end a prefix"));
        }
        if name.len() > crate::limits::BUCKET_BYTES_MAX {
            return Err(bad("the bucket name is too long"));
        }
        Ok(Grant { buckets, access })
    }
}

/// A key as the cluster stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyEntry {
    /// Random salt of `hash`.
    pub salt: [u8; SALT_BYTES],
    /// `SHA-256(domain | salt | secret)`; all zero for a deleted key.
    pub hash: [u8; 32],
    /// May change plugins, buckets, the cluster and keys, and use every bucket.
    pub admin: bool,
    /// Buckets it may use (besides everything, for an admin key).
    pub grants: Vec<Grant>,
    /// The write that created (or deleted) it.
    pub stamp: Stamp,
    /// True once deleted: kept so that gossip from a node that missed the deletion cannot
    /// bring the key back.
    pub deleted: bool,
}

impl KeyEntry {
    /// A new live key for `secret`.
    pub fn new(
        secret: &[u8; SECRET_BYTES],
        salt: [u8; SALT_BYTES],
        admin: bool,
        grants: Vec<Grant>,
        stamp: Stamp,
    ) -> KeyEntry {
        KeyEntry {
            salt,
            hash: hash_secret(&salt, secret),
            admin,
            grants,
            stamp,
            deleted: false,
        }
    }

    /// The deletion marker of a key, as of `stamp`.
    pub fn tombstone(stamp: Stamp) -> KeyEntry {
        KeyEntry {
            salt: [0; SALT_BYTES],
            hash: [0; 32],
            admin: false,
            grants: Vec::new(),
            stamp,
            deleted: true,
        }
    }

    /// True when `secret` is this key's secret (never for a deleted key). Compares in
    /// constant time, so timing does not leak how much of a guess was right.
    pub fn verifies(&self, secret: &[u8]) -> bool {
        if self.deleted || secret.len() != SECRET_BYTES {
            return false;
        }
        let computed = hash_secret(&self.salt, secret);
        let diff = computed
            .iter()
            .zip(self.hash.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        diff == 0
    }

    /// Whether this key may do `need`; the error says why not.
    pub fn authorize(&self, need: &Need) -> Result<(), Denied> {
        if self.deleted {
            return Err(Denied::Deleted);
        }
        match need {
            Need::AnyKey => Ok(()),
            Need::Admin => {
                if self.admin {
                    Ok(())
                } else {
                    Err(Denied::NotAdmin)
                }
            }
            Need::Bucket { bucket, access } => {
                let granted = self.admin
                    || self
                        .grants
                        .iter()
                        .any(|g| g.buckets.matches(bucket) && g.access.allows(*access));
                if granted {
                    Ok(())
                } else {
                    Err(Denied::NoGrant {
                        bucket: bucket.clone(),
                        access: *access,
                    })
                }
            }
        }
    }
}

/// What a request needs from its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Need {
    /// Any valid key (status, ring, listings).
    AnyKey,
    /// An admin key (plugins, bucket properties, membership, keys).
    Admin,
    /// A grant of `access` on `bucket` (or an admin key).
    Bucket {
        /// The bucket.
        bucket: String,
        /// Read for gets, write for puts, deletes and updates.
        access: Access,
    },
}

/// Why a valid key may not do something.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// The key was deleted.
    #[error("the key was deleted")]
    Deleted,
    /// The operation needs an admin key.
    #[error("it needs an admin key")]
    NotAdmin,
    /// No grant covers the bucket with that access.
    #[error("the key has no {} grant on bucket {bucket:?}", access.name())]
    NoGrant {
        /// The bucket.
        bucket: String,
        /// The access wanted.
        access: Access,
    },
}

/// The salt of a bootstrap key (`--admin-key-file`): derived from the key's name, so every
/// node that adds the same key from the same file makes the identical entry and a merge
/// never swaps one node's entry for another's (a connection authenticated against the one
/// would then look like it used a replaced key). The secret is random and 256 bits long,
/// so a salt known in advance gives an attacker nothing to precompute.
pub fn bootstrap_salt(name: &str) -> [u8; SALT_BYTES] {
    let digest: [u8; 32] = Sha256::new()
        .chain_update(b"quiver bootstrap salt v1\0")
        .chain_update(name.as_bytes())
        .finalize()
        .into();
    let mut salt = [0u8; SALT_BYTES];
    salt.copy_from_slice(&digest[..SALT_BYTES]);
    salt
}

/// `SHA-256(domain | salt | secret)`.
pub fn hash_secret(salt: &[u8; SALT_BYTES], secret: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(HASH_DOMAIN);
    h.update(salt);
    h.update(secret);
    h.finalize().into()
}

/// True for a usable key name: 1 to 64 ASCII letters, digits, `-` and `_`.
pub fn valid_key_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= KEY_NAME_CHARS_MAX
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// An access key as a client holds it: the name and the secret. Its `Debug` never shows
/// the secret, so it cannot end up in a log by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyToken {
    name: String,
    secret: [u8; SECRET_BYTES],
}

impl std::fmt::Debug for KeyToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyToken({}.<secret>)", self.name)
    }
}

impl KeyToken {
    /// A token from its parts.
    pub fn new(name: &str, secret: [u8; SECRET_BYTES]) -> Result<KeyToken, AccessError> {
        if !valid_key_name(name) {
            return Err(AccessError::InvalidName(name.to_string()));
        }
        Ok(KeyToken {
            name: name.to_string(),
            secret,
        })
    }

    /// Parses `NAME.SECRET` (the secret as 64 hex digits); surrounding whitespace, as in a
    /// key file's trailing newline, is ignored.
    pub fn parse(text: &str) -> Result<KeyToken, AccessError> {
        let text = text.trim();
        let malformed = || AccessError::MalformedToken;
        let (name, hex) = text.rsplit_once('.').ok_or_else(malformed)?;
        if hex.len() != SECRET_BYTES * 2 {
            return Err(malformed());
        }
        let mut secret = [0u8; SECRET_BYTES];
        for (i, byte) in secret.iter_mut().enumerate() {
            let pair = hex.get(2 * i..2 * i + 2).ok_or_else(malformed)?;
            *byte = u8::from_str_radix(pair, 16).map_err(|_| malformed())?;
        }
        KeyToken::new(name, secret)
    }

    /// The key's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The secret bytes.
    pub fn secret(&self) -> &[u8; SECRET_BYTES] {
        &self.secret
    }

    /// The text form `NAME.SECRET`, for key files and `QUIVER_KEY`. It is the secret: show
    /// it once, never log it.
    pub fn reveal(&self) -> String {
        use std::fmt::Write;
        let mut out = String::with_capacity(self.name.len() + 1 + 2 * SECRET_BYTES);
        out.push_str(&self.name);
        out.push('.');
        for b in &self.secret {
            let _ = write!(out, "{b:02x}");
        }
        out
    }
}

/// Bad access-key input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    /// The token is not `NAME.SECRET` with a 64-hex-digit secret.
    #[error("malformed access key: expected NAME.SECRET as printed by `quiver key create`")]
    MalformedToken,
    /// The name has characters or a length a key name may not have.
    #[error("invalid key name {0:?}: 1 to {KEY_NAME_CHARS_MAX} ASCII letters, digits, `-` or `_`")]
    InvalidName(String),
    /// A grant does not parse.
    #[error("invalid grant {grant:?}: {why}")]
    InvalidGrant {
        /// As given.
        grant: String,
        /// What is wrong.
        why: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(admin: bool, grants: &[&str]) -> (KeyEntry, [u8; SECRET_BYTES]) {
        let secret = [7u8; SECRET_BYTES];
        let grants = grants
            .iter()
            .map(|g| g.parse().expect("grant parses"))
            .collect();
        (
            KeyEntry::new(&secret, [1; SALT_BYTES], admin, grants, Stamp::at(1, "n1")),
            secret,
        )
    }

    fn bucket(b: &str, access: Access) -> Need {
        Need::Bucket {
            bucket: b.into(),
            access,
        }
    }

    #[test]
    fn only_the_secret_verifies_and_never_for_a_deleted_key() {
        let (e, secret) = entry(false, &[]);
        assert!(e.verifies(&secret));
        let mut wrong = secret;
        wrong[31] ^= 1;
        assert!(!e.verifies(&wrong));
        assert!(!e.verifies(&secret[..31]));
        let mut other_salt = e.clone();
        other_salt.salt = [2; SALT_BYTES];
        assert!(!other_salt.verifies(&secret));
        assert!(!KeyEntry::tombstone(Stamp::at(2, "n1")).verifies(&[0; SECRET_BYTES]));
    }

    #[test]
    fn grants_allow_exactly_their_buckets_and_access() {
        let (e, _) = entry(false, &["carts:read", "logs-*:readwrite", "up:write"]);
        assert!(e.authorize(&bucket("carts", Access::Read)).is_ok());
        assert!(e.authorize(&bucket("carts", Access::Write)).is_err());
        assert!(e.authorize(&bucket("carts2", Access::Read)).is_err());
        assert!(e.authorize(&bucket("logs-a", Access::Write)).is_ok());
        assert!(e.authorize(&bucket("logs", Access::Read)).is_err());
        assert!(e.authorize(&bucket("up", Access::Write)).is_ok());
        assert!(e.authorize(&bucket("up", Access::Read)).is_err());
        assert_eq!(e.authorize(&Need::Admin), Err(Denied::NotAdmin));
        assert!(e.authorize(&Need::AnyKey).is_ok());
        let (admin, _) = entry(true, &[]);
        assert!(admin.authorize(&bucket("any", Access::Write)).is_ok());
        assert!(admin.authorize(&Need::Admin).is_ok());
        let (all, _) = entry(false, &["*:read"]);
        assert!(all.authorize(&bucket("x", Access::Read)).is_ok());
        assert!(all.authorize(&bucket("x", Access::Write)).is_err());
    }

    // Every node adds the same `--admin-key-file` key; their entries must be identical, or
    // gossip would swap one for another under connections authenticated against it.
    #[test]
    fn a_bootstrap_key_added_by_every_node_merges_to_one_entry() {
        use crate::meta::MetaState;
        let secret = [9u8; SECRET_BYTES];
        let states: Vec<MetaState> = ["n1", "n2"]
            .iter()
            .map(|_| {
                let entry = KeyEntry::new(
                    &secret,
                    bootstrap_salt("admin"),
                    true,
                    Vec::new(),
                    Stamp::zero(),
                );
                MetaState {
                    keys: [("admin".to_string(), entry)].into_iter().collect(),
                    ..MetaState::default()
                }
            })
            .collect();
        let mut merged = states[0].clone();
        assert!(merged.merge(&states[1]).is_empty(), "nothing to replace");
        assert_ne!(bootstrap_salt("admin"), bootstrap_salt("admin2"));
    }

    #[test]
    fn grants_and_tokens_parse_strictly_and_round_trip() {
        for g in ["carts:read", "logs-*:readwrite", "*:write"] {
            let parsed: Grant = g.parse().expect("parses");
            assert_eq!(parsed.to_string(), g);
        }
        for bad in ["carts", "carts:all", ":read", "a*b:read", "a**:read"] {
            assert!(bad.parse::<Grant>().is_err(), "{bad} should be refused");
        }
        let token = KeyToken::new("ops-1", [0xab; SECRET_BYTES]).expect("valid");
        let text = token.reveal();
        assert_eq!(KeyToken::parse(&format!("{text}\n")), Ok(token.clone()));
        assert!(!format!("{token:?}").contains("abab"));
        for bad in ["", "x", "name.zz", "na me.00", &text[..text.len() - 1]] {
            assert!(KeyToken::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
