//! Axis-aligned boxes `[x0, y0, x1, y1]`: IoU and greedy non-maximum suppression, shared by
//! automatic mask generation ([`crate::amg`]), edge detection ([`crate::edges`]) and the object
//! detector ([`crate::detector`]). Each caller's results are compared with a reference, so each
//! keeps that reference's arithmetic: [`nms`] is `torchvision.ops.nms` on f32 mask boxes (Meta's
//! mask generator), [`box_iou`] and [`nms_in_order`] the detector's f64 boxes (onnxruntime's
//! detections).

/// A box `[x0, y0, x1, y1]`; for mask boxes x1/y1 are the last pixel inside (inclusive).
pub type BoxXyxy = [f32; 4];

/// `torchvision.ops.nms`: indices kept, by decreasing score (stable for equal scores); a box is
/// dropped when its IoU with a kept box is above `iou_threshold`.
pub fn nms(boxes: &[BoxXyxy], scores: &[f32], iou_threshold: f32) -> Vec<usize> {
    let mut order: Vec<usize> = (0..boxes.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let area = |b: &BoxXyxy| (b[2] - b[0]) * (b[3] - b[1]);
    let mut suppressed = vec![false; boxes.len()];
    let mut keep = Vec::new();
    for (n, &i) in order.iter().enumerate() {
        if suppressed[i] {
            continue;
        }
        keep.push(i);
        let bi = &boxes[i];
        for &j in &order[n + 1..] {
            if suppressed[j] {
                continue;
            }
            let bj = &boxes[j];
            let w = (bi[2].min(bj[2]) - bi[0].max(bj[0])).max(0.0);
            let h = (bi[3].min(bj[3]) - bi[1].max(bj[1])).max(0.0);
            let inter = w * h;
            let iou = inter / (area(bi) + area(bj) - inter);
            if f64::from(iou) > f64::from(iou_threshold) {
                suppressed[j] = true;
            }
        }
    }
    keep
}

/// IoU of two `[x0, y0, x1, y1]` boxes; 0 when the union is empty.
pub fn box_iou(a: &[f64; 4], b: &[f64; 4]) -> f64 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    let area = |r: &[f64; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let union = area(a) + area(b) - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}

/// Greedy NMS of `[x0, y0, x1, y1]` boxes in f64 (the detector's, compared with onnxruntime's
/// detections): walks `order` (indices into `boxes`, best first) and keeps each box whose
/// [`box_iou`] with every box kept before it is at most `iou_threshold`.
pub fn nms_in_order(boxes: &[[f64; 4]], order: &[usize], iou_threshold: f64) -> Vec<usize> {
    let mut kept: Vec<usize> = Vec::new();
    for &a in order {
        if kept
            .iter()
            .all(|&k| box_iou(&boxes[a], &boxes[k]) <= iou_threshold)
        {
            kept.push(a);
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nms_matches_torchvision() {
        // torchvision.ops.batched_nms(boxes, scores, zeros, 0.7) -> [1, 3, 2]
        let boxes = [
            [0.0, 0.0, 10.0, 10.0],
            [1.0, 1.0, 11.0, 11.0],
            [20.0, 20.0, 30.0, 30.0],
            [0.0, 0.0, 10.0, 9.0],
        ];
        assert_eq!(nms(&boxes, &[0.9, 0.95, 0.5, 0.95], 0.7), vec![1, 3, 2]);
        assert_eq!(nms(&[], &[], 0.7), Vec::<usize>::new());
    }

    #[test]
    fn iou_of_boxes() {
        assert_eq!(
            box_iou(&[0.0, 0.0, 2.0, 2.0], &[1.0, 1.0, 3.0, 3.0]),
            1.0 / 7.0
        );
        assert_eq!(box_iou(&[0.0, 0.0, 1.0, 1.0], &[2.0, 2.0, 3.0, 3.0]), 0.0);
        assert_eq!(box_iou(&[0.0, 0.0, 0.0, 0.0], &[0.0, 0.0, 0.0, 0.0]), 0.0);
    }

    #[test]
    fn nms_in_order_keeps_boxes_in_the_order_given() {
        let boxes = [
            [0.0, 0.0, 2.0, 2.0],
            [0.0, 0.0, 2.0, 1.0],
            [1.0, 1.0, 3.0, 3.0],
            [5.0, 5.0, 6.0, 6.0],
        ];
        // IoU of boxes 0 and 1: 0.5; of boxes 0 and 2: 1/7; the others do not overlap.
        assert_eq!(nms_in_order(&boxes, &[0, 1, 2, 3], 0.5), vec![0, 1, 2, 3]);
        assert_eq!(nms_in_order(&boxes, &[3, 2, 1, 0], 0.4), vec![3, 2, 1]);
        assert_eq!(nms_in_order(&boxes, &[0, 1, 2, 3], 0.1), vec![0, 3]);
        assert_eq!(nms_in_order(&boxes, &[], 0.5), Vec::<usize>::new());
    }
}
