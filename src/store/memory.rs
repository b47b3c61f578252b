//! The memory tier: a moka cache of small, hot objects, weighted by their size in
//! bytes so the configured budget is a real bound.

use bytes::Bytes;
use moka::future::Cache;

/// What the memory tier keeps for one object.
#[derive(Clone)]
pub struct Hot {
    pub bytes: Bytes,
    pub sha256: String,
}

#[derive(Clone)]
pub struct Memory {
    cache: Cache<String, Hot>,
    item_max: u64,
}

impl Memory {
    pub fn new(budget: u64, item_max: u64) -> Memory {
        let cache = Cache::builder()
            .max_capacity(budget)
            .weigher(|key: &String, hot: &Hot| {
                let weight = key.len() + hot.sha256.len() + hot.bytes.len();
                u32::try_from(weight).unwrap_or(u32::MAX)
            })
            .build();
        Memory {
            cache,
            item_max: item_max.min(u64::from(u32::MAX)),
        }
    }

    /// Whether an object of `size` bytes is small enough to keep here.
    pub fn fits(&self, size: u64) -> bool {
        size <= self.item_max
    }

    /// Bytes held now (by the weigher: keys, digests and bodies).
    pub fn weighted_size(&self) -> u64 {
        self.cache.weighted_size()
    }

    pub async fn get(&self, key: &str) -> Option<Hot> {
        self.cache.get(key).await
    }

    pub async fn insert(&self, key: String, hot: Hot) {
        if self.fits(hot.bytes.len() as u64) {
            self.cache.insert(key, hot).await;
        }
    }
}
