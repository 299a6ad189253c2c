"""Guest networking: TAP devices, addresses, nftables policy, DNS, published ports."""
