//! COCO run-length encoding, byte-compatible with pycocotools (`maskApi.c`: `rleEncode`,
//! `rleToString`, `rleFrString`): runs over the mask in column-major order, starting with a run of
//! zeros (possibly empty), written as the compressed ASCII string `counts`.

use serde::{Deserialize, Serialize};

use crate::postprocess::Mask;

/// A COCO RLE object as pycocotools writes it: `{"size": [h, w], "counts": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CocoRle {
    pub size: [usize; 2],
    pub counts: String,
}

/// Run lengths of a row-major mask, in COCO's column-major order, starting with zeros.
pub fn encode_counts(mask: &Mask) -> Vec<u32> {
    encode_counts_at(mask, 0, 0, mask.height, mask.width)
}

/// Run lengths of `mask` placed with its top-left corner at (`x0`, `y0`) in an otherwise empty
/// `height × width` image (a crop's mask in image coordinates, without building the big mask).
pub fn encode_counts_at(
    mask: &Mask,
    x0: usize,
    y0: usize,
    height: usize,
    width: usize,
) -> Vec<u32> {
    debug_assert!(x0 + mask.width <= width && y0 + mask.height <= height);
    let mut counts = Vec::new();
    let (mut current, mut run) = (false, 0u32);
    let mut push = |v: bool, n: u32| {
        if n == 0 {
            return;
        }
        if v != current {
            counts.push(run);
            run = 0;
            current = v;
        }
        run += n;
    };
    for x in 0..width {
        if x < x0 || x >= x0 + mask.width {
            push(false, height as u32);
            continue;
        }
        push(false, y0 as u32);
        for y in 0..mask.height {
            push(mask.get(x - x0, y), 1);
        }
        push(false, (height - y0 - mask.height) as u32);
    }
    counts.push(run);
    counts
}

/// Decodes column-major run lengths into a row-major mask; `None` unless they cover
/// `height × width` exactly.
pub fn decode_counts(counts: &[u32], height: usize, width: usize) -> Option<Mask> {
    let total: u64 = counts.iter().map(|&c| u64::from(c)).sum();
    if total != (height * width) as u64 {
        return None;
    }
    let mut data = vec![false; height * width];
    let (mut i, mut value) = (0usize, false);
    for &c in counts {
        if value {
            for k in i..i + c as usize {
                data[(k % height) * width + k / height] = true;
            }
        }
        i += c as usize;
        value = !value;
    }
    Some(Mask {
        width,
        height,
        data,
    })
}

/// `rleToString`: LEB128-like, 5 bits per character offset by 48, each count after the second
/// stored as the difference to the count two before.
pub fn counts_to_string(counts: &[u32]) -> String {
    let mut s = String::new();
    for (i, &c) in counts.iter().enumerate() {
        let mut x = i64::from(c);
        if i > 2 {
            x -= i64::from(counts[i - 2]);
        }
        loop {
            let mut ch = (x & 0x1f) as u8;
            x >>= 5;
            let more = if ch & 0x10 != 0 { x != -1 } else { x != 0 };
            if more {
                ch |= 0x20;
            }
            s.push((ch + 48) as char);
            if !more {
                break;
            }
        }
    }
    s
}

/// `rleFrString`: the inverse of [`counts_to_string`]; `None` on a malformed string.
pub fn counts_from_string(s: &str) -> Option<Vec<u32>> {
    let bytes = s.as_bytes();
    let mut counts: Vec<u32> = Vec::new();
    let mut p = 0;
    while p < bytes.len() {
        let mut x: i64 = 0;
        let mut k = 0;
        loop {
            let c = i64::from(bytes.get(p)?.checked_sub(48)?);
            if c > 0x3f || k > 12 {
                return None;
            }
            x |= (c & 0x1f) << (5 * k);
            let more = c & 0x20 != 0;
            p += 1;
            k += 1;
            if !more {
                if c & 0x10 != 0 {
                    x |= -1i64 << (5 * k);
                }
                break;
            }
        }
        if counts.len() > 2 {
            x += i64::from(counts[counts.len() - 2]);
        }
        counts.push(u32::try_from(x).ok()?);
    }
    Some(counts)
}

impl CocoRle {
    /// Encodes a mask.
    pub fn encode(mask: &Mask) -> Self {
        CocoRle {
            size: [mask.height, mask.width],
            counts: counts_to_string(&encode_counts(mask)),
        }
    }

    /// Decodes into a mask; `None` if the string is malformed or does not cover `size` exactly.
    pub fn decode(&self) -> Option<Mask> {
        let [height, width] = self.size;
        decode_counts(&counts_from_string(&self.counts)?, height, width)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(height: usize, width: usize, on: &[(usize, usize)]) -> Mask {
        let mut data = vec![false; width * height];
        for &(x, y) in on {
            data[y * width + x] = true;
        }
        Mask {
            width,
            height,
            data,
        }
    }

    #[test]
    fn counts_are_column_major_and_start_with_zeros() {
        // 2 rows x 3 columns, pixels (x=0,y=0) and (x=1,y=1) set.
        // Column-major: (0,0)=1 (0,1)=0 (1,0)=0 (1,1)=1 (2,0)=0 (2,1)=0 -> runs 0,1,2,1,2
        let m = mask(2, 3, &[(0, 0), (1, 1)]);
        assert_eq!(encode_counts(&m), vec![0, 1, 2, 1, 2]);
    }

    #[test]
    fn string_matches_pycocotools() {
        // pycocotools.mask.encode(np.asfortranarray(m)) for the masks below.
        // m = zeros((2, 3)); m[0,0] = m[1,1] = 1  -> b'01211'? computed by hand with rleToString:
        // counts [0,1,2,1,2]: "0", "1", "2", then 1-1=0 -> "0", 2-2=0 -> "0"
        assert_eq!(counts_to_string(&[0, 1, 2, 1, 2]), "01200");
        // A large run needs several characters: 100 = 0b11_00100 -> low 5 bits 4 with 'more', then 3.
        assert_eq!(counts_to_string(&[100]), "T3");
        // Negative differences use the sign bit of the last group: 5 - 40 = -35.
        let s = counts_to_string(&[1, 40, 3, 5]);
        assert_eq!(counts_from_string(&s).unwrap(), vec![1, 40, 3, 5]);
        // From pycocotools on a 4x4 mask with a 2x2 square at rows 1..3, cols 1..3:
        // counts [5, 2, 2, 2, 5] -> "52203"
        let m = mask(4, 4, &[(1, 1), (2, 1), (1, 2), (2, 2)]);
        assert_eq!(encode_counts(&m), vec![5, 2, 2, 2, 5]);
        assert_eq!(CocoRle::encode(&m).counts, "52203");
    }

    #[test]
    fn round_trip() {
        let mut state = 12345u64;
        for (h, w) in [(1, 1), (7, 3), (64, 65), (300, 451)] {
            let data = (0..h * w)
                .map(|i| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (state >> 33) % 7 < 3 || (i / w) % 17 < 5
                })
                .collect();
            let m = Mask {
                width: w,
                height: h,
                data,
            };
            let rle = CocoRle::encode(&m);
            assert_eq!(rle.size, [h, w]);
            assert_eq!(rle.decode().unwrap(), m);
        }
        let full = Mask {
            width: 40,
            height: 30,
            data: vec![true; 1200],
        };
        assert_eq!(CocoRle::encode(&full).decode().unwrap(), full);
    }

    #[test]
    fn malformed_strings_are_rejected() {
        assert!(CocoRle {
            size: [2, 2],
            counts: "0\u{1}".into()
        }
        .decode()
        .is_none());
        assert!(CocoRle {
            size: [2, 2],
            counts: "3".into()
        }
        .decode()
        .is_none());
        // A trailing character with the 'more' bit set and nothing after it.
        assert!(counts_from_string("P").is_none());
    }
}
