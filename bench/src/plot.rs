//! `docs/bench-scale.svg`: the scale section's curves, drawn by the bench
//! next to its tables.

use std::path::Path;

use plotters::prelude::*;

use crate::scale::{ShapeResult, WAYS};

const COLORS: [RGBColor; 3] = [RGBColor(31, 119, 180), RGBColor(44, 160, 44), RED];

/// One panel: a figure of each way against the shapes' `x`.
struct Panel<'a> {
    title: &'a str,
    x_desc: &'a str,
    y_desc: &'a str,
    /// (x, a figure of each way) per shape, in order of x.
    points: Vec<(f64, [f64; 3])>,
}

/// Draws three panels: Vault requests per pod-hour against pods (at 20
/// secrets) and against secrets (at 500 pods), and KV write → every pod's
/// file (p99) against pods; log scales.
pub fn scale(results: &[ShapeResult], path: &Path) -> anyhow::Result<()> {
    let by_pods: Vec<&ShapeResult> = {
        let secrets = results
            .iter()
            .map(|r| r.shape.secrets)
            .max_by_key(|s| results.iter().filter(|r| r.shape.secrets == *s).count())
            .unwrap_or_default();
        results
            .iter()
            .filter(|r| r.shape.secrets == secrets)
            .collect()
    };
    let largest = results
        .iter()
        .map(|r| r.shape.pods)
        .max()
        .unwrap_or_default();
    let by_secrets: Vec<&ShapeResult> =
        results.iter().filter(|r| r.shape.pods == largest).collect();
    let sorted = |mut points: Vec<(f64, [f64; 3])>| {
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        points
    };
    let secrets_at = by_pods.first().map_or(0, |r| r.shape.secrets);
    let panels = [
        Panel {
            title: &format!("Vault requests, {secrets_at} secrets"),
            x_desc: "pods",
            y_desc: "requests per pod-hour",
            points: sorted(
                by_pods
                    .iter()
                    .map(|r| (r.shape.pods as f64, r.per_pod_hour))
                    .collect(),
            ),
        },
        Panel {
            title: &format!("Vault requests, {largest} pods"),
            x_desc: "KV secrets",
            y_desc: "requests per pod-hour",
            points: sorted(
                by_secrets
                    .iter()
                    .map(|r| (r.shape.secrets as f64, r.per_pod_hour))
                    .collect(),
            ),
        },
        Panel {
            title: &format!("KV write → every pod's file, {secrets_at} secrets"),
            x_desc: "pods",
            y_desc: "p99 (ms)",
            points: sorted(
                by_pods
                    .iter()
                    .map(|r| (r.shape.pods as f64, r.write_to_file.map(|(_, p99)| p99)))
                    .collect(),
            ),
        },
    ];
    let root = SVGBackend::new(path, (1260, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    for (area, panel) in root.split_evenly((1, 3)).iter().zip(&panels) {
        draw(area, panel)?;
    }
    root.present()?;
    Ok(())
}

fn draw(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    panel: &Panel<'_>,
) -> anyhow::Result<()> {
    let finite = |v: &f64| v.is_finite() && *v > 0.0;
    let xs: Vec<f64> = panel.points.iter().map(|p| p.0).collect();
    let ys: Vec<f64> = panel
        .points
        .iter()
        .flat_map(|p| p.1)
        .filter(finite)
        .collect();
    let (x_min, x_max) = bounds(&xs);
    let (y_min, y_max) = bounds(&ys);
    let mut chart = ChartBuilder::on(area)
        .caption(panel.title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(
            (x_min / 1.3..x_max * 1.3).log_scale(),
            (y_min / 2.0..y_max * 2.0).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc(panel.x_desc)
        .y_desc(panel.y_desc)
        .draw()?;
    for (way, name) in WAYS.iter().enumerate() {
        let color = COLORS[way];
        let points: Vec<(f64, f64)> = panel
            .points
            .iter()
            .map(|(x, ys)| (*x, ys[way]))
            .filter(|(_, y)| finite(y))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart.draw_series(
            points
                .into_iter()
                .map(|point| Circle::new(point, 3, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// The smallest and largest of `values` (1 and 10 when there are none).
fn bounds(values: &[f64]) -> (f64, f64) {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if min.is_finite() && max.is_finite() {
        (min, max)
    } else {
        (1.0, 10.0)
    }
}
