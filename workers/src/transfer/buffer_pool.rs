//! [`BufferPool`]: receive buffers a TCP receiver reuses across transfers. A fresh multi-MiB allocation is
//! fresh pages, and faulting them in while reading the socket halved loopback throughput in
//! `benches/kv_transfer.rs` (a raw loopback socket read into fresh 8 MiB buffers: 1.2 GB/s; into a reused
//! one: 2.5 GB/s). Buffers come back through [`crate::transfer::KvReceiver::recycle`] once the decode
//! worker has copied a transfer into its engine.

use std::sync::Mutex;

use bytes::BytesMut;

pub(crate) struct BufferPool {
    buffers: Mutex<Vec<BytesMut>>,
    max_retained_bytes: usize,
}

impl BufferPool {
    pub(crate) fn new(max_retained_bytes: usize) -> Self {
        Self {
            buffers: Mutex::new(Vec::new()),
            max_retained_bytes,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<BytesMut>> {
        // Each update is one push or remove: a poisoned lock still holds a consistent list.
        self.buffers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// An empty buffer with room for `len` bytes: the smallest retained one that fits, else a new one.
    pub(crate) fn take(&self, len: usize) -> BytesMut {
        let mut buffers = self.lock();
        let best = buffers
            .iter()
            .enumerate()
            .filter(|(_, buffer)| buffer.capacity() >= len)
            .min_by_key(|(_, buffer)| buffer.capacity())
            .map(|(index, _)| index);
        match best {
            Some(index) => {
                let mut buffer = buffers.swap_remove(index);
                buffer.clear();
                buffer
            }
            None => BytesMut::with_capacity(len),
        }
    }

    /// Keeps `buffer` for a later transfer unless that would retain more than the limit.
    pub(crate) fn give(&self, buffer: BytesMut) {
        let mut buffers = self.lock();
        let retained: usize = buffers.iter().map(BytesMut::capacity).sum();
        if retained + buffer.capacity() <= self.max_retained_bytes {
            buffers.push(buffer);
        }
    }

    #[cfg(test)]
    fn retained_bytes(&self) -> usize {
        self.lock().iter().map(BytesMut::capacity).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_the_smallest_fitting_buffer_within_the_limit() {
        let pool = BufferPool::new(3000);
        let small = pool.take(1000);
        let large = pool.take(2000);
        assert!(small.capacity() >= 1000 && large.capacity() >= 2000);
        let large_ptr = large.as_ptr();
        pool.give(large);
        pool.give(small);
        assert!(pool.retained_bytes() <= 3000);
        let again = pool.take(1500);
        assert_eq!(
            again.as_ptr(),
            large_ptr,
            "the retained 2000-byte buffer serves 1500"
        );
        assert!(again.is_empty());
        pool.give(BytesMut::with_capacity(5000));
        assert!(pool.retained_bytes() <= 3000, "over the limit: dropped");
    }
}
