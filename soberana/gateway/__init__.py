"""soberana.gateway"""
