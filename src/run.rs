//! `persona run`: the engine and the HTTP server on the configured source.

use crate::config::Settings;
use crate::engine::{self, Mode, Shared};
use crate::server::Server;
use anyhow::{bail, Result};

pub fn command(settings: Settings) -> Result<()> {
    let source = settings.source.clone();
    if !source.path.is_file() {
        bail!("source.path {} does not exist or is not a file (run from the repository root, or set PERSONA_SOURCE_PATH)", source.path.display());
    }
    if !source.catalog_path.as_os_str().is_empty() && !source.catalog_path.is_file() {
        bail!("source.catalog_path {} does not exist or is not a file (set it to \"\" for no catalog)", source.catalog_path.display());
    }
    let listen = settings.listen.clone();
    let shared = Shared::new(
        settings,
        source.path.clone(),
        source.dead_letter_path.clone(),
    );
    let server = Server::start(&listen, shared.clone(), true)?;
    tracing::info!(workers = shared.workers.len(), source = %source.path.display(), follow = source.follow, "persona listening on http://{}", server.addr);
    let guards = engine::start(shared.clone(), Mode::Run, None)?;
    let result = engine::join(guards);
    shared.shutdown();
    server.join();
    if result.is_ok() {
        tracing::info!("stopped");
    }
    result
}
