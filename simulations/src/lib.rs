//! Simulator (filled by the simulator issue).
