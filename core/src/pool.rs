//! A bounded free list of vectors, so that the buffers a batch passes through are reused
//! instead of allocated and freed once per batch.
//!
//! Batches of ten thousand records make buffers of hundreds of kilobytes. Freeing one on one
//! thread and allocating the next on another makes the system allocator hand memory back to the
//! kernel and fault it in again, page by page: on the benchmark that cost more than the work on
//! the records. A pool keeps a few spare buffers instead; it never holds more than its limit.

use std::sync::Mutex;

/// Spare vectors of `T`: at most `limit` of them, each of at most `max_bytes`.
pub struct VecPool<T> {
    spare: Mutex<Vec<Vec<T>>>,
    limit: usize,
    max_bytes: usize,
}

impl<T> VecPool<T> {
    /// A pool keeping at most `limit` spare vectors, each allocated for at most `max_bytes`:
    /// it holds `limit * max_bytes` at most.
    pub const fn new(limit: usize, max_bytes: usize) -> Self {
        Self {
            spare: Mutex::new(Vec::new()),
            limit,
            max_bytes,
        }
    }

    /// An empty vector with room for at least `capacity` items: a spare one if one fits (at
    /// most four times larger, so that small holders do not keep big buffers). Asking for
    /// nothing allocates nothing.
    pub fn take(&self, capacity: usize) -> Vec<T> {
        if capacity == 0 {
            return Vec::new();
        }
        let mut spare = self
            .spare
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let fits = |v: &Vec<T>| v.capacity() >= capacity && v.capacity() / 4 <= capacity;
        match spare.iter().rposition(fits) {
            Some(at) => spare.swap_remove(at),
            // Growing a spare would copy its whole old allocation for nothing.
            None => Vec::with_capacity(capacity),
        }
    }

    /// Returns a vector for reuse; its items are dropped now. Vectors without an allocation or
    /// larger than the pool takes, and any beyond its limit, are simply freed.
    pub fn give(&self, mut v: Vec<T>) {
        let bytes = v.capacity().saturating_mul(std::mem::size_of::<T>());
        if bytes == 0 || bytes > self.max_bytes {
            return;
        }
        v.clear();
        let mut spare = self
            .spare
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if spare.len() < self.limit {
            spare.push(v);
        }
    }

    /// How many spare vectors the pool holds.
    pub fn spares(&self) -> usize {
        self.spare
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }
}

impl<T> std::fmt::Debug for VecPool<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VecPool")
            .field("spares", &self.spares())
            .field("limit", &self.limit)
            .field("max_bytes", &self.max_bytes)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_vector_comes_back_empty_with_its_allocation() {
        let pool = VecPool::new(2, 1 << 20);
        let mut v = pool.take(100);
        v.extend(0..100u32);
        let ptr = v.as_ptr();
        pool.give(v);
        let again = pool.take(40);
        assert!(again.is_empty());
        assert_eq!(again.as_ptr(), ptr);
        assert!(again.capacity() >= 100);
    }

    #[test]
    fn the_pool_never_keeps_more_than_its_limit() {
        let pool = VecPool::new(2, 64);
        pool.give(vec![1u8; 65]);
        assert_eq!(pool.spares(), 0, "larger than the pool takes");
        pool.give(Vec::new());
        assert_eq!(pool.spares(), 0, "nothing to reuse");
        for _ in 0..5 {
            pool.give(vec![1u8; 10]);
        }
        assert_eq!(pool.spares(), 2);
    }

    #[test]
    fn a_spare_too_small_or_too_large_stays_in_the_pool() {
        let pool = VecPool::new(2, 1 << 20);
        pool.give(vec![0u64; 4]);
        assert!(pool.take(1000).capacity() >= 1000);
        assert_eq!(
            pool.spares(),
            1,
            "the small spare waits for a small request"
        );
        pool.give(Vec::with_capacity(100_000));
        assert!(pool.take(10).capacity() < 100_000, "not the big one");
        assert_eq!(pool.take(0).capacity(), 0, "nothing asked, nothing taken");
        assert_eq!(pool.spares(), 2);
        assert_eq!(pool.take(3).capacity(), 4, "a spare that fits");
        assert_eq!(pool.spares(), 1);
    }
}
