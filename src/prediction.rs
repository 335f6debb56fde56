//! From logits to answers: softmax, and the top-k classes with their labels.

use serde::Serialize;

use crate::registry::Labels;

/// One class in a top-k answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    /// Logit index.
    pub index: usize,
    /// Class name, or null when the model's class count matches no label list.
    pub label: Option<String>,
    /// Softmax probability.
    pub score: f32,
}

/// Softmax over one row of logits, computed in f64 for stability.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f64> = logits
        .iter()
        .map(|&l| (f64::from(l) - f64::from(max)).exp())
        .collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| (e / sum) as f32).collect()
}

/// The `k` most probable classes, best first (ties keep index order).
pub fn top_k(logits: &[f32], k: usize, labels: Option<&Labels>) -> Vec<Prediction> {
    let probs = softmax(logits);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    order
        .into_iter()
        .take(k)
        .map(|index| Prediction {
            index,
            label: labels.and_then(|l| l.get(index)).map(String::from),
            score: probs[index],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_sums_to_one_and_is_stable() {
        let p = softmax(&[1000.0, 1000.0, 0.0]);
        assert!((p[0] - 0.5).abs() < 1e-6 && (p[1] - 0.5).abs() < 1e-6 && p[2] == 0.0);
        let p = softmax(&[1.0, 2.0, 3.0]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((p[2] - 0.665_240_9).abs() < 1e-6);
    }

    #[test]
    fn top_k_orders_and_labels() {
        let labels = Labels::imagenet();
        let mut logits = vec![0f32; 1000];
        logits[281] = 5.0;
        logits[7] = 3.0;
        logits[9] = 3.0;
        let t = top_k(&logits, 3, Some(&labels));
        assert_eq!(
            t.iter().map(|p| p.index).collect::<Vec<_>>(),
            vec![281, 7, 9]
        );
        assert_eq!(t[0].label.as_deref(), Some("tabby, tabby cat"));
        assert!(t[0].score > t[1].score);
        assert_eq!(top_k(&[1.0, 2.0], 5, None).len(), 2);
        assert_eq!(top_k(&[1.0, 2.0], 5, None)[0].label, None);
    }
}
