"""soberana.server"""
