//! The partitioner of Kafka's own clients (Java's default, librdkafka's `murmur2_random`,
//! kafka-python's): murmur2 of the key, made positive, modulo the number of partitions.
//! rskafka leaves partitioning to its user; choosing as the others do keeps an interface's
//! messages in the partition that any other producer of the same key would use.

/// Kafka's murmur2 (seed 0x9747b28c) of `data`, with the sign bit cleared.
pub fn positive(data: &[u8]) -> u32 {
    murmur2(data) & 0x7fff_ffff
}

/// The partition of a key whose [`positive`] hash is `hash`, among `partitions`.
pub fn partition(hash: u32, partitions: u32) -> u32 {
    hash % partitions.max(1)
}

fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    // Kafka's length is a Java int: keys are far shorter.
    let mut h = SEED ^ (data.len() as u32);
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        for (i, &byte) in tail.iter().enumerate().rev() {
            h ^= u32::from(byte) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The values of Kafka's own test of its murmur2 (UtilsTest.testMurmur2).
    #[test]
    fn matches_kafkas_murmur2() {
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (key, expected) in cases {
            assert_eq!(murmur2(key) as i32, expected, "{key:?}");
        }
        assert_eq!(positive(b"21"), (-973_932_308i32 as u32) & 0x7fff_ffff);
        assert_eq!(partition(positive(b"abc"), 3), 479_470_107 % 3);
    }
}
