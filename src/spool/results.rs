//! What a result says about one output tensor.

use crate::runtime::FloatTensor;
use serde::Serialize;

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct OutputSummary {
    pub name: String,
    pub shape: Vec<usize>,
    pub min: f32,
    pub max: f32,
    pub mean: f32,
    /// For vector outputs (one axis longer than 1): the largest value's index.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub argmax: Option<usize>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub top5: Vec<Ranked>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Ranked {
    pub index: usize,
    pub value: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

pub fn summarise(name: &str, t: &FloatTensor, labels: Option<&[String]>) -> OutputSummary {
    let finite = t.data.iter().copied().filter(|v| v.is_finite());
    let (min, max) = finite
        .clone()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    let mean = if t.data.is_empty() {
        0.0
    } else {
        (t.data.iter().map(|&v| v as f64).sum::<f64>() / t.data.len() as f64) as f32
    };
    let is_vector = t.shape.iter().filter(|&&d| d > 1).count() == 1;
    let mut top5 = vec![];
    let mut argmax = None;
    if is_vector {
        let mut order: Vec<usize> = (0..t.data.len()).collect();
        order.sort_by(|&a, &b| t.data[b].total_cmp(&t.data[a]));
        argmax = order.first().copied();
        top5 = order
            .iter()
            .take(5)
            .map(|&i| Ranked {
                index: i,
                value: t.data[i],
                label: labels.and_then(|l| l.get(i).cloned()),
            })
            .collect();
    }
    OutputSummary {
        name: name.to_string(),
        shape: t.shape.clone(),
        min,
        max,
        mean,
        argmax,
        top5,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_get_a_ranking_with_labels() {
        let t = FloatTensor::new(vec![1, 3], vec![0.2, 0.7, 0.1]).unwrap();
        let labels = vec!["a".to_string(), "b".into(), "c".into()];
        let s = summarise("prob", &t, Some(&labels));
        assert_eq!(s.argmax, Some(1));
        assert_eq!(s.top5[0].label.as_deref(), Some("b"));
        assert_eq!(s.top5.len(), 3);
        assert!((s.mean - 1.0 / 3.0).abs() < 1e-6);
        let map = FloatTensor::new(vec![1, 2, 2, 1], vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        assert!(summarise("m", &map, None).top5.is_empty());
    }
}
