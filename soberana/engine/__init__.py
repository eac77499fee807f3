"""soberana.engine"""
