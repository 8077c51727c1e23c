//! Where a lake is and how its objects are named, read and deleted.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::manifest::Manifest;

/// What ends a manifest's name (and makes it one).
pub const MANIFEST_SUFFIX: &str = ".manifest.json";

/// A lake: a store and the prefix the lake's objects are under.
#[derive(Clone)]
pub struct Lake {
    store: Arc<dyn ObjectStore>,
    root: Path,
    /// As the user gave it, for messages.
    pub url: String,
}

/// A segment's manifest as listed: where it is, when it was written, what it says.
#[derive(Debug, Clone)]
pub struct Listed {
    pub manifest_path: Path,
    pub written: SystemTime,
    pub manifest: Manifest,
}

impl Listed {
    /// The directory the segment, index and manifest share.
    pub fn dir(&self) -> Path {
        let mut parts: Vec<_> = self.manifest_path.parts().collect();
        parts.pop();
        Path::from_iter(parts)
    }

    pub fn segment_path(&self) -> Path {
        self.dir().clone().join(self.manifest.segment.as_str())
    }

    pub fn index_path(&self) -> Path {
        self.dir().clone().join(self.manifest.index.as_str())
    }
}

/// What became of listing the lake: the segments, and the manifests that cannot be read.
pub struct Listing {
    pub segments: Vec<Listed>,
    pub unreadable: Vec<(Path, String)>,
}

impl Lake {
    /// The lake in an existing local directory.
    pub fn local(dir: &std::path::Path) -> Result<Self, object_store::Error> {
        let store = LocalFileSystem::new_with_prefix(dir)?;
        Ok(Self {
            store: Arc::new(store),
            root: Path::default(),
            url: dir.display().to_string(),
        })
    }

    /// The lake under `root` of `store` (an S3 bucket).
    pub fn in_store(store: Arc<dyn ObjectStore>, root: Path, url: String) -> Self {
        Self { store, root, url }
    }

    /// The directory a receiver's segment started at `started` goes to.
    pub fn segment_dir(&self, receiver: &str, started: SystemTime) -> Path {
        let t = time::OffsetDateTime::from(started);
        self.root
            .clone()
            .join(format!(
                "date={:04}-{:02}-{:02}",
                t.year(),
                u8::from(t.month()),
                t.day()
            ))
            .join(format!("hour={:02}", t.hour()))
            .join(format!("receiver={receiver}"))
    }

    /// Every manifest of the lake.
    pub async fn list(&self) -> Result<Listing, object_store::Error> {
        let metas: Vec<_> = self.store.list(Some(&self.root)).try_collect().await?;
        let mut segments = Vec::new();
        let mut unreadable = Vec::new();
        for meta in metas {
            if !meta.location.as_ref().ends_with(MANIFEST_SUFFIX) {
                continue;
            }
            let bytes = match self.get(&meta.location).await {
                Ok(b) => b,
                // Deleted since listed (retention): gone with its segment.
                Err(object_store::Error::NotFound { .. }) => continue,
                Err(e) => return Err(e),
            };
            match Manifest::from_bytes(&bytes) {
                Ok(manifest) => segments.push(Listed {
                    manifest_path: meta.location,
                    written: meta.last_modified.into(),
                    manifest,
                }),
                Err(why) => unreadable.push((meta.location, why)),
            }
        }
        segments.sort_by_key(|s| (s.manifest.first_ns, s.manifest_path.to_string()));
        Ok(Listing {
            segments,
            unreadable,
        })
    }

    /// An object's size.
    pub async fn size(&self, path: &Path) -> Result<u64, object_store::Error> {
        Ok(self.store.head(path).await?.size)
    }

    pub async fn get(&self, path: &Path) -> Result<Bytes, object_store::Error> {
        self.store.get(path).await?.bytes().await
    }

    /// One byte range of an object.
    pub async fn get_range(
        &self,
        path: &Path,
        range: std::ops::Range<u64>,
    ) -> Result<Bytes, object_store::Error> {
        self.store.get_range(path, range).await
    }

    /// The byte ranges of one object, each as asked for.
    pub async fn get_ranges(
        &self,
        path: &Path,
        ranges: &[std::ops::Range<u64>],
    ) -> Result<Vec<Bytes>, object_store::Error> {
        self.store.get_ranges(path, ranges).await
    }

    pub async fn put(&self, path: &Path, bytes: Bytes) -> Result<(), object_store::Error> {
        self.store
            .put(path, PutPayload::from(bytes))
            .await
            .map(drop)
    }

    /// Deletes `receiver`'s oldest segments beyond what `keep` allows; returns how many.
    /// Read from the listing alone (the receiver's directories, the objects' sizes and
    /// times), without fetching a manifest.
    pub async fn retain(&self, receiver: &str, keep: Keep) -> Result<usize, object_store::Error> {
        let own = format!("/receiver={receiver}/");
        let metas: Vec<_> = self.store.list(Some(&self.root)).try_collect().await?;
        // Each of the receiver's segments: its files, their bytes, when its manifest was
        // written (none: not published, or half deleted; left alone).
        let mut segments: BTreeMap<String, (Vec<Path>, u64, Option<SystemTime>)> = BTreeMap::new();
        for meta in metas {
            let key = format!("/{}", meta.location);
            if !key.contains(&own) {
                continue;
            }
            let Some((stem, kind)) = key.rsplit_once('/').and_then(|(_, name)| {
                [(MANIFEST_SUFFIX, 0), (".parquet", 1), (".pcapng", 2)]
                    .into_iter()
                    .find_map(|(suffix, kind)| Some((name.strip_suffix(suffix)?, kind)))
            }) else {
                continue;
            };
            let dir = key.rsplit_once('/').map_or("", |(d, _)| d);
            let entry = segments.entry(format!("{dir}/{stem}")).or_default();
            entry.1 += meta.size;
            if kind == 0 {
                entry.2 = Some(meta.last_modified.into());
                // The manifest goes first.
                entry.0.insert(0, meta.location);
            } else {
                entry.0.push(meta.location);
            }
        }
        let mut published: Vec<(SystemTime, Vec<Path>, u64)> = segments
            .into_values()
            .filter_map(|(paths, bytes, written)| Some((written?, paths, bytes)))
            .collect();
        published.sort_by_key(|(written, _, _)| *written);
        let now = SystemTime::now();
        let mut total: u64 = published.iter().map(|(_, _, bytes)| bytes).sum();
        let mut deleted = 0;
        for (written, paths, bytes) in &published {
            let expired = match keep {
                Keep::Age(age) => now.duration_since(*written).unwrap_or_default() > age,
                Keep::Bytes(limit) => total > limit,
            };
            if !expired {
                break;
            }
            for path in paths {
                match self.store.delete(path).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            total -= bytes;
            deleted += 1;
        }
        Ok(deleted)
    }
}

/// How much of a receiver's segments the lake keeps (`--lake-keep`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Segments written within this long.
    Age(Duration),
    /// The newest segments up to this many bytes (segments and indexes).
    Bytes(u64),
}
