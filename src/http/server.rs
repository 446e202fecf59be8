//! The listening server, assembled from actix-web's own parts: actix-server accepts on every worker thread,
//! actix-http's HTTP/1 service parses each request and gives it to the actix-web app, except WebSocket upgrades,
//! whose request and socket go to [`upgrade::accept`]. `HttpServer` does all of this but the last: it offers
//! no way to take the socket at the upgrade, which is what lets a WebSocket connection shed actix-http's
//! per-connection buffers (see `transport`). Every accepted socket is wrapped in [`stall::Guarded`], the write
//! deadline the connection's requests can arm (event streams do).

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use actix_http::HttpService;
use actix_server::{Server, ServerBuilder};
use actix_service::{IntoServiceFactory, ServiceFactoryExt, fn_service, map_config};
use actix_web::dev::AppConfig;
use actix_web::{App, web};

use crate::core::config::Config;
use crate::demo;
use crate::http::polling::PollerApi;
use crate::http::{admission, stall, upgrade};
use crate::node::hub::Hub;
use crate::node::observer::ChannelObserver;

/// Pending connections the kernel queues per listener while workers accept (connection bursts after a
/// deploy or a network blip arrive all at once).
const BACKLOG: u32 = 2048;

/// A bound, not yet running server.
pub struct Bound {
    builder: ServerBuilder,
    pub addrs: Vec<SocketAddr>,
}

impl Bound {
    pub fn run(self) -> Server {
        self.builder.run()
    }
}

/// Binds every address `server.host` resolves to. Done first, before anything else starts, so a port in use
/// fails the start cleanly.
pub fn listen_all(config: &Config) -> std::io::Result<Vec<std::net::TcpListener>> {
    let listeners = (config.server.host.as_str(), config.server.port)
        .to_socket_addrs()?
        .map(listen)
        .collect::<std::io::Result<Vec<_>>>()?;
    if listeners.is_empty() {
        return Err(std::io::Error::other("the host resolved to no address"));
    }
    Ok(listeners)
}

/// Prepares the workers on bound listeners. Each worker thread gets its own channel registry, so a session, its
/// registry and its socket stay on one thread.
pub fn serve(
    listeners: Vec<std::net::TcpListener>,
    config: &Config,
    hub: Hub,
    poller: web::Data<PollerApi>,
    observer: Arc<dyn ChannelObserver>,
    demo_state: Option<web::Data<demo::DemoState>>,
) -> std::io::Result<Bound> {
    let mut builder = Server::build()
        .disable_signals()
        .backlog(BACKLOG)
        .shutdown_timeout(config.server.shutdown_timeout.as_secs().max(1));
    if config.server.workers > 0 {
        builder = builder.workers(config.server.workers);
    }
    let max_body = config.websocket.max_message_bytes;
    // One for all workers: the connection budgets are the replica's.
    let admission = admission::Admission::new(config);
    let mut addrs = Vec::new();
    for listener in listeners {
        let local = listener.local_addr()?;
        addrs.push(local);
        let hub = hub.clone();
        let poller = poller.clone();
        let observer = observer.clone();
        let demo_state = demo_state.clone();
        let admission = admission.clone();
        builder = builder.listen(format!("relayhub-{local}"), listener, move || {
            let registry = hub.start_registry(observer.clone());
            let demo_state = demo_state.clone();
            let app = App::new()
                .app_data(web::Data::new(hub.clone()))
                .app_data(web::Data::new(registry.clone()))
                .app_data(poller.clone())
                .app_data(web::Data::from(admission.clone()))
                .app_data(web::PayloadConfig::new(max_body))
                .configure(super::routes)
                .configure(move |cfg| {
                    if let Some(state) = demo_state {
                        demo::configure_with(cfg, state);
                    }
                })
                .configure(super::static_routes);
            let upgrade_hub = hub.clone();
            let admission = admission.clone();
            let http = HttpService::build()
                // HttpServer's default: a client gets 1 s to close after the server's response said close.
                .client_disconnect_timeout(Duration::from_secs(1))
                .local_addr(local)
                // Each request can reach its connection's write deadline (event streams arm it).
                .on_connect_ext(|io: &stall::Guarded, ext| {
                    ext.insert(io.deadline().clone());
                })
                .upgrade(fn_service(move |request: upgrade::Upgrade| {
                    upgrade::accept(
                        request,
                        upgrade_hub.clone(),
                        registry.clone(),
                        admission.clone(),
                    )
                }))
                .finish(map_config(
                    app.into_factory()
                        .map_err(|error: actix_web::Error| error.error_response()),
                    // The app's host and address are only used to build URLs, which relayhub does not.
                    |_| AppConfig::default(),
                ));
            fn_service(|io: tokio::net::TcpStream| async move {
                // Realtime frames are small: without TCP_NODELAY, Nagle's algorithm holds them back.
                let _ = io.set_nodelay(true);
                let peer = io.peer_addr().ok();
                Ok::<_, actix_http::error::DispatchError>((
                    stall::Guarded::new(io),
                    actix_http::Protocol::Http1,
                    peer,
                ))
            })
            .and_then(http)
        })?;
    }
    Ok(Bound { builder, addrs })
}

fn listen(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    // A restarted hub must be able to bind while old connections sit in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)?.into_std()
}
