"""The network: WebRTC links, signaling, mDNS discovery, loopback mode and the mesh key."""
