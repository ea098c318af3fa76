//! `mgm plot`: the loss curve of a training run's metrics.jsonl as an SVG, one colour per stage.

use std::path::Path;

use plotters::prelude::*;

use crate::{Error, Result};

/// Reads `metrics` (one JSON object per step with `step`, `stage`, `loss`) and draws the loss
/// against the step into `output` (SVG).
pub fn loss_curve(metrics: &Path, output: &Path) -> Result<()> {
    let text = std::fs::read_to_string(metrics).map_err(|e| Error::Io {
        path: metrics.display().to_string(),
        source: e,
    })?;
    let mut stages: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| Error::Config {
            path: metrics.display().to_string(),
            msg: format!("line {}: {e}", i + 1),
        })?;
        let (Some(step), Some(loss), Some(stage)) =
            (v["step"].as_f64(), v["loss"].as_f64(), v["stage"].as_str())
        else {
            return Err(Error::Config {
                path: metrics.display().to_string(),
                msg: format!("line {}: needs step, loss and stage", i + 1),
            });
        };
        match stages.last_mut() {
            Some((s, pts)) if s == stage => pts.push((step, loss)),
            _ => stages.push((stage.to_string(), vec![(step, loss)])),
        }
    }
    let all: Vec<(f64, f64)> = stages.iter().flat_map(|(_, p)| p.iter().copied()).collect();
    if all.is_empty() {
        return Err(Error::Config {
            path: metrics.display().to_string(),
            msg: "no steps to plot".into(),
        });
    }
    let max_step = all.iter().map(|p| p.0).fold(1.0, f64::max);
    let (lo, hi) = all
        .iter()
        .filter(|p| p.1 > 0.0)
        .fold((f64::INFINITY, 0f64), |a, p| (a.0.min(p.1), a.1.max(p.1)));
    let draw_err = |e: String| Error::Io {
        path: output.display().to_string(),
        source: std::io::Error::other(e),
    };
    let root = SVGBackend::new(output, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("training loss", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..max_step, (lo.max(1e-4) * 0.8..hi * 1.2).log_scale())
        .map_err(|e| draw_err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .draw()
        .map_err(|e| draw_err(e.to_string()))?;
    let colours = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    for (i, (name, pts)) in stages.iter().enumerate() {
        let c = colours[i % colours.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
            .map_err(|e| draw_err(e.to_string()))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| draw_err(e.to_string()))?;
    root.present().map_err(|e| draw_err(e.to_string()))?;
    Ok(())
}
